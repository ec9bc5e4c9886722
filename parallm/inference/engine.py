"""The serving engine: requests in, one model step at a time, outputs out.

`LLMEngine.step()` asks the scheduler for a batch, runs it on the model runner, samples the
sequences that reached their last token, lets the scheduler advance them (stop tokens, length),
and detokenizes incrementally (stop strings). Requests can be added and aborted between steps,
which is all an asynchronous front end (the HTTP server) needs. A bad request never stops the
engine: it finishes at once with an `error` and the other requests go on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parallm.errors import UserError
from parallm.inference.detokenizer import IncrementalDetokenizer
from parallm.inference.model_runner import GiB, ModelRunner, blocks_for_budget, local_kv_heads
from parallm.inference.paged_attention import KVPool
from parallm.inference.sampling import Sampler, SamplingParams, make_generator
from parallm.inference.scheduler import Scheduler, SchedulerConfig
from parallm.inference.sequence import Sequence
from parallm.models.hf import load_pretrained
from parallm.tokenizer import Tokenizer


@dataclass(kw_only=True)
class EngineConfig:
    """How the engine sizes its cache and batches. `kv_cache_memory`: bytes for the KV cache
    (an int), or on a GPU a fraction (0, 1] of the memory free after loading the model."""

    max_model_len: int | None = None  # default: the model's context
    kv_cache_memory: int | float | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    dtype: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: {getattr(self, name)} is not valid; must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise UserError(f"kv_cache_memory: {self.kv_cache_memory} is not valid; must be > 0")


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
    error: str | None = None


class LLMEngine:
    """Continuous batching over a paged KV cache for one model directory."""

    def __init__(self, model: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model = load_pretrained(model, dtype=config.dtype, device=config.device).eval()
        self.tokenizer = Tokenizer.from_dir(model)
        args = self.model.args
        self.max_model_len = config.max_model_len or args.max_seq_len
        if self.max_model_len > args.max_seq_len:
            raise UserError(
                f"max_model_len: {self.max_model_len} exceeds the model's context of "
                f"{args.max_seq_len} tokens"
            )
        num_blocks = self._num_blocks()
        self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=config.block_size,
                num_blocks=num_blocks,
                enable_prefix_caching=config.enable_prefix_caching,
                enable_chunked_prefill=config.enable_chunked_prefill,
            )
        )
        self.sampler = Sampler()
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._by_seq: dict[int, _Request] = {}

    def _num_blocks(self) -> int:
        c = self.config
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        if isinstance(c.kv_cache_memory, float) and c.kv_cache_memory <= 1:
            if device.type != "cuda":
                raise UserError("kv_cache_memory: a fraction needs a GPU; give bytes on CPU")
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * c.kv_cache_memory)
        elif c.kv_cache_memory is not None:
            budget = int(c.kv_cache_memory)
        elif device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * 0.8)
        else:
            # CPU: room for max_num_seqs full contexts, at most 1 GiB.
            per_token = KVPool.bytes_per_block(
                self.model.args, 1, local_kv_heads(self.model), dtype
            )
            budget = min(GiB, c.max_num_seqs * self.max_model_len * per_token)
        blocks = blocks_for_budget(self.model, budget, c.block_size, dtype)
        if blocks < 1:
            raise UserError(
                f"kv_cache_memory: {budget} bytes hold no KV block of {c.block_size} tokens"
            )
        return blocks

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None
    ) -> None:
        """Queue a request; a bad one is finished at once with an error, never raised."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        req = _Request(request_id, text, [], params)
        self.requests[request_id] = req
        try:
            req.prompt_token_ids = self._prompt_ids(prompt)
        except UserError as e:
            req.error = str(e)
            return
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
            self.scheduler.add(seq)

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise UserError("prompt: token ids must be integers")
        if not ids:
            raise UserError("prompt: empty; give at least one token")
        vocab = self.model.args.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UserError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    def abort_request(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            self.scheduler.abort(seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling + model step; outputs of every request that changed."""
        touched: dict[str, _Request] = {}
        for seq in self.scheduler.pop_finished():
            touched[self._by_seq[seq.seq_id].request_id] = self._by_seq[seq.seq_id]
        batch = self.scheduler.schedule()
        if not batch.is_empty:
            logits, sampled = self.runner.execute(batch.seqs, batch.num_new_tokens)
            tokens: dict[int, int] = {}
            if sampled:
                reqs = [self._by_seq[s.seq_id] for s in sampled]
                out = self.sampler(
                    logits,
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
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            error=error,
        )
