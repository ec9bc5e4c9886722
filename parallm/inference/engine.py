"""The serving engine: requests in, one model step at a time, outputs out.

`LLMEngine.step()` asks the scheduler for a batch, runs it on the model runner, samples the
sequences that reached their last token, lets the scheduler advance them (stop tokens, length),
and detokenizes incrementally (stop strings). Requests can be added and aborted between steps,
which is all an asynchronous front end (the HTTP server) needs. A bad request never stops the
engine: it finishes at once with an `error` and the other requests go on.

Prompt log-probabilities (`SamplingParams.prompt_logprobs`) are taken from the logits of the
prompt positions as their chunks are computed; the first sequence of such a request skips the
prefix cache until it has them all (cached tokens have no logits), and they are computed once
per request whatever `n`.

With `enable_lora`, requests may name a LoRA adapter loaded with `add_lora` (by name, between
steps); requests of the base and of different adapters share each step (`lora.py`), and an
adapter's KV blocks are never shared with the base's or another adapter's. `remove_lora` lets
the requests already using an adapter finish on it (`adapters.py`).

`LLMEngine.from_model` runs on a model already in memory (a trainer's, LoRA modules and all)
instead of loading one: the engine reads the very tensors the trainer updates in place, so after
an update (`weights_updated`, which drops the prefix cache computed with the old weights) it
samples from the new weights without a checkpoint or a copy. It runs each step in eval mode and
gives the trainer its modes back.

With `tensor_parallel_size` N > 1 this process is rank 0 of N (see `tp.py`): it keeps the
scheduler, the sampler and the detokenizers, and every rank runs each step on its shard of the
model and of the KV cache; the other ranks run `worker.py`. `close()` stops them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from parallm.errors import UserError
from parallm.inference.adapters import AdapterRegistry, LoadedAdapter
from parallm.inference.config import EngineConfig
from parallm.inference.detokenizer import IncrementalDetokenizer
from parallm.inference.model_runner import ModelRunner, PromptRows, StepOutput
from parallm.inference.sampling import (
    Sampler,
    SamplingParams,
    TokenLogprobs,
    compute_logprobs,
    make_generator,
)
from parallm.inference.scheduler import Scheduler, SchedulerConfig, admission_error
from parallm.inference.sequence import Sequence
from parallm.inference.tp import TPGroup
from parallm.inference.worker import (
    build_runner,
    check_shared_model,
    check_tensor_parallel,
    eval_mode,
    max_model_len_for,
    run_worker,
    runner_for,
)
from parallm.models.hf import read_family
from parallm.models.peft_format import read_adapter
from parallm.tokenizer import Tokenizer

# Prompt rows log-softmaxed at once: a (256, vocab) float32 copy at a time, not one per prompt.
PROMPT_LOGPROBS_CHUNK = 256


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # stop | length | abort | error
    logprobs: list[dict] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None
    # Per prompt token: None for the first, then its log-probability given the ones before it
    # (when asked for, and once the whole prompt is computed).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    detok: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    generators: dict[int, torch.Generator | None] = field(default_factory=dict)
    logprobs: dict[int, list[dict]] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    error: str | None = None
    adapter: LoadedAdapter | None = None  # held until the request has finished


class RequestChecks:
    """The checks of a request that need no model, only the tokenizer, the vocabulary size and
    the scheduler's limits: the engine's own, and those of a server whose engine runs in another
    process (`parallm.serve.engine_process.EngineView`)."""

    tokenizer: Tokenizer
    vocab_size: int
    max_model_len: int
    scheduler_config: SchedulerConfig

    def admission_error(self, p: int, k: int) -> tuple[str, str] | None:
        """Why a request of `p` prompt tokens and `max_tokens` `k` could never run, as (the
        field at fault, the message); None if it can."""
        return admission_error(self.scheduler_config, p, k)

    def check_request(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids if the request could run; else UserError naming the field at
        fault (as the request's error from `add_request` would say, but before queueing it)."""
        ids = self._prompt_ids(prompt)
        found = self.admission_error(len(ids), params.max_tokens)
        if found is not None:
            raise UserError(found[1], param=found[0])
        return ids

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise UserError("prompt: token ids must be integers")
        if not ids:
            raise UserError("prompt: empty; give at least one token")
        vocab = self.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UserError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids


class LLMEngine(RequestChecks):
    """Continuous batching over a paged KV cache for one model directory (or, through
    `from_model`, one model in memory): the driver.

    With `tensor_parallel_size` N > 1 the engine is rank 0 of N: it starts N - 1 worker
    processes (`worker.py`), or, in a process group of N processes (torchrun), is rank 0 of it,
    while ranks > 0 call `worker.serve_rank` (which `LLM` does for them).
    """

    def __init__(self, model: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        spec, args = read_family(model)
        if spec.is_video:
            raise UserError(
                f"model: {model} is a {spec.model_types[0]} video model, not a language model; "
                f"generate with `parallm video generate --model {model}`, or serve it with "
                f"`parallm serve --video-model {model}`"
            )
        facts = spec.facts(args)
        self.max_model_len = max_model_len_for(facts, config)
        self.vocab_size = facts.vocab_size
        self.tp: TPGroup | None = None
        if config.tensor_parallel_size > 1:  # a size that does not fit fails before any spawn
            if dist.is_initialized() and dist.get_rank() > 0:
                raise RuntimeError(
                    "LLMEngine is the driver (rank 0); ranks > 0 of a torchrun launch call "
                    "parallm.inference.worker.serve_rank (LLM does)"
                )
            device_type = check_tensor_parallel(args, config)
            serve_args = (model, config, self.max_model_len)
            self.tp = TPGroup.start(
                config.tensor_parallel_size, device_type, run_worker, serve_args
            )
        try:
            runner = build_runner(model, config, self.max_model_len, self.tp)
            tokenizer = Tokenizer.from_dir(model)  # after the weights: their errors first
        except BaseException:
            self.close()
            raise
        self._start(runner, tokenizer)

    @classmethod
    def from_model(
        cls, model: nn.Module, tokenizer: Tokenizer, config: EngineConfig | None = None
    ) -> LLMEngine:
        """An engine whose model IS `model` (a parallm language model on its device, e.g. a
        trainer's, possibly with training LoRA modules), tokenized by `tokenizer`: nothing is
        loaded and no weight is copied, so the engine samples from whatever the tensors hold.
        Call `weights_updated` after changing them. Tensor parallelism and `enable_lora` are
        not available here (UserError naming the field); the KV cache is sized by `config`
        (on a GPU give `kv_cache_memory` in bytes: the default fraction of the free memory
        would leave the trainer's activations and optimizer no room)."""
        engine = cls.__new__(cls)
        engine.config = config = config or EngineConfig()
        facts = check_shared_model(model, config)
        engine.max_model_len = max_model_len_for(facts, config)
        engine.vocab_size = facts.vocab_size
        engine.tp = None
        engine._start(runner_for(model, config, engine.max_model_len, None), tokenizer)
        return engine

    def _start(self, runner: ModelRunner, tokenizer: Tokenizer) -> None:
        """The driver's state around a built runner (whichever way its model came)."""
        config = self.config
        self.runner = runner
        self.tokenizer = tokenizer
        self.model = self.runner.model
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=config.block_size,
                num_blocks=self.runner.pool.num_blocks,
                enable_prefix_caching=config.enable_prefix_caching,
                enable_chunked_prefill=config.enable_chunked_prefill,
            )
        )
        self.sampler = Sampler(config.logprobs_mode)
        self.adapters = AdapterRegistry(config.max_loras)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._by_seq: dict[int, _Request] = {}

    def weights_updated(self) -> None:
        """Say that the model's weights changed in place (an optimizer step): every cached
        prefix, computed with the old weights, is dropped. Only between batches of requests:
        a RuntimeError while any is unfinished (their KV mixes old and new weights)."""
        if self.has_unfinished_requests():
            raise RuntimeError(
                f"weights_updated: {len(self.requests)} requests are unfinished; finish or "
                "abort them (and step until they report) before updating the weights"
            )
        self.scheduler.block_manager.reset_prefix_cache()

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do on one process). Idempotent."""
        if self.tp is not None:
            self.tp.close()

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        lora: str | None = None,
    ) -> None:
        """Queue a request, through the adapter named `lora` (None: the base model); a bad one
        is finished at once with an error, never raised."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        req = _Request(request_id, text, [], params)
        self.requests[request_id] = req
        try:
            req.prompt_token_ids = self._prompt_ids(prompt)
            if lora is not None:
                req.adapter = self.adapters.acquire(lora)
        except UserError as e:
            req.error = str(e)
            return
        slot, key = (req.adapter.slot, req.adapter.cache_key) if req.adapter else (-1, 0)
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops |= set(self.tokenizer.eos_token_ids)
        for i in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                token_ids=list(req.prompt_token_ids),
                num_prompt_tokens=len(req.prompt_token_ids),
                max_tokens=params.max_tokens,
                stop_token_ids=frozenset(stops),
                lora_slot=slot,
                lora_key=key,
            )
            req.seqs.append(seq)
            req.detok[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer,
                req.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            seed = None if params.seed is None else params.seed + i
            req.generators[seq.seq_id] = make_generator(seed, self.runner.device)
            req.logprobs[seq.seq_id] = []
            self._by_seq[seq.seq_id] = req
            if i == 0 and params.prompt_logprobs is not None:
                req.prompt_logprobs = [None]  # the first token has no context to score it
                if seq.num_prompt_tokens > 1:
                    seq.prompt_logits_from = 0
            self.scheduler.add(seq)

    # -- adapters ------------------------------------------------------------------------------

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return self.scheduler.config

    @property
    def lora_enabled(self) -> bool:
        """Whether adapters can be loaded (the engine was built with adapter slots)."""
        return self.runner.lora is not None

    def add_lora(self, name: str, path: str | Path, *, field: str = "lora") -> LoadedAdapter:
        """Load the peft adapter directory `path` under `name` (between steps); a UserError
        naming `field` if it cannot be served, and then nothing is loaded."""
        if self.runner.lora is None:
            raise UserError(
                f"{field}: adapters need an engine with enable_lora=True (serve: --lora or "
                "--enable-lora)"
            )
        self.adapters.check_name(name)
        path = str(Path(path).resolve())
        adapter = read_adapter(path, self.model.args, field=field)
        self.runner.lora.check(adapter, field)
        slot = self.adapters.free_slot()
        self.runner.load_lora(slot, adapter, path)
        return self.adapters.add(name, path, slot, adapter.spec.r)

    def remove_lora(self, name: str) -> LoadedAdapter:
        """Unload adapter `name`: new requests for it fail from now on; those already queued or
        running finish on it (`in_flight` of the result), then its slot is free."""
        return self.adapters.remove(name)

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.abort(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def run_to_completion(self) -> dict[str, RequestOutput]:
        """Step until no request is left; each finished request's last output by id."""
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return done

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling + model step; outputs of every request that changed."""
        touched: dict[str, _Request] = {}
        for seq in self.scheduler.pop_finished():
            touched[self._by_seq[seq.seq_id].request_id] = self._by_seq[seq.seq_id]
        batch = self.scheduler.schedule()
        if not batch.is_empty:
            with eval_mode(self.model):  # a trainer's model may be in training mode
                step = self.runner.execute(batch.seqs, batch.num_new_tokens)
            self._take_prompt_logprobs(step)
            sampled = step.sampled
            tokens: dict[int, int] = {}
            if sampled:
                assert step.logits is not None
                reqs = [self._by_seq[s.seq_id] for s in sampled]
                out = self.sampler(
                    step.logits[step.sample_rows].float(),
                    [r.params for r in reqs],
                    sampled,
                    [r.generators[s.seq_id] for r, s in zip(reqs, sampled, strict=True)],
                )
                for i, (req, seq) in enumerate(zip(reqs, sampled, strict=True)):
                    tokens[seq.seq_id] = out.token_ids[i]
                    if req.params.logprobs is not None and out.logprobs:
                        req.logprobs[seq.seq_id].append(out.logprobs[i])
            finished = {s.seq_id for s in self.scheduler.update(batch, tokens)}
            for seq_id, token in tokens.items():
                req = self._by_seq[seq_id]
                touched[req.request_id] = req
                detok = req.detok[seq_id]
                detok.add(token)
                if detok.stopped is not None and seq_id not in finished:
                    stopped = self.scheduler.abort(seq_id)
                    if stopped is not None:
                        stopped.finish_reason = "stop"
                elif seq_id in finished:
                    detok.flush()  # text held back (a possible stop string, a partial char)
            self.scheduler.pop_finished()  # stop-string aborts are reported below, as stops
        for req in list(self.requests.values()):
            if req.error is not None:
                touched[req.request_id] = req
        return [self._output(req) for req in touched.values()]

    def _take_prompt_logprobs(self, step: StepOutput) -> None:
        """Keep the prompt log-probabilities of this step's prompt rows (chosen token and top N
        only), and advance each sequence's `prompt_logits_from` past them."""
        for rows in step.prompt_rows:
            assert step.logits is not None
            req, seq = self._by_seq[rows.seq.seq_id], rows.seq
            assert req.prompt_logprobs is not None and req.params.prompt_logprobs is not None
            # A prompt recomputed after a preemption yields no row already taken.
            assert rows.first_position == len(req.prompt_logprobs) - 1
            req.prompt_logprobs += prompt_logprobs(step.logits, rows, req.params.prompt_logprobs)
            end = rows.first_position + rows.count
            seq.prompt_logits_from = end if end < seq.num_prompt_tokens - 1 else None

    def _output(self, req: _Request) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=i,
                text=req.detok[s.seq_id].text,
                token_ids=s.generated_ids,
                finish_reason=s.finish_reason,
                logprobs=req.logprobs[s.seq_id] if req.params.logprobs is not None else None,
            )
            for i, s in enumerate(req.seqs)
        ]
        finished = req.error is not None or all(s.is_finished for s in req.seqs)
        error = req.error or next((s.error for s in req.seqs if s.error), None)
        if finished:
            self.requests.pop(req.request_id, None)
            for s in req.seqs:
                self._by_seq.pop(s.seq_id, None)
            if req.adapter is not None:
                self.adapters.release(req.adapter)
                req.adapter = None
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            error=error,
            prompt_logprobs=self._complete_prompt_logprobs(req),
        )

    @staticmethod
    def _complete_prompt_logprobs(req: _Request) -> list[TokenLogprobs | None] | None:
        """The prompt log-probabilities once all are known; None before (an error or an abort
        can end a request half-prefilled)."""
        lps = req.prompt_logprobs
        return lps if lps is not None and len(lps) == len(req.prompt_token_ids) else None


def prompt_logprobs(logits: torch.Tensor, rows: PromptRows, top_n: int) -> list[TokenLogprobs]:
    """Log-probabilities of the prompt tokens after `rows.seq`'s positions `rows.first_position`
    .. + `rows.count` - 1, from their logits rows of a step's `logits` (R, vocab): the raw
    log-softmax in float32, computed chunk by chunk, keeping the chosen token and the top N."""
    p, seq = rows.first_position, rows.seq
    targets = torch.tensor(seq.token_ids[p + 1 : p + 1 + rows.count], device=logits.device)
    found: list[TokenLogprobs] = []
    for i in range(0, rows.count, PROMPT_LOGPROBS_CHUNK):
        j = min(i + PROMPT_LOGPROBS_CHUNK, rows.count)
        chunk = logits[rows.first_row + i : rows.first_row + j].float().log_softmax(dim=-1)
        found += compute_logprobs(chunk, targets[i:j], [top_n] * (j - i))
    return found
