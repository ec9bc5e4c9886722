"""Training objectives as plug-ins: a typed `Batch` and a `Task` that makes batches from the
data and scores the model's output. One file per objective in this package; a task registers
itself by name with `@register_task` and is chosen by `[task] name`.

The step (`train/step.py`) owns everything about layouts: it splits a batch into micro-batches,
shards token tensors over context-parallel ranks, runs plain or pipelined forwards, and
normalises the loss by the *global* number of counted units (`Task.count`: tokens with a label,
pairs, sequences, ...), summed over data- and context-parallel ranks and every micro-batch
before the step. So a task only says what one unit's loss is, and every layout computes the
single-process loss, whatever each rank holds. A task that scores the policy against a frozen
reference (DPO) says so (`needs_reference`): the step runs the reference on each batch first and
the task keeps what it needs of its logits in `Batch.extras`.

A task may own the model call (`forward`: by default the language model's call on the token
tensors). One whose model splits its own tokens over the context-parallel ranks (the video
diffusion task: the layout tells the model its spatial shard) sets `model_shards_tokens`; its
batches carry their tensors in `extras` with empty (B, 0) token tensors, and the step counts each
rank's share 1/cp of every unit.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from parallm.errors import UserError
from parallm.models.attention import AttentionSpec
from parallm.train.data import PackedDataset, RowDataset

IGNORE_INDEX = -100  # a label that is not counted (prompt tokens, padding), as in PyTorch / HF


@dataclass
class Batch:
    """Rows of tokens and what the loss needs of them.

    Token tensors are (B, T): `input_ids`; `labels` (IGNORE_INDEX where not counted);
    `position_ids` (None: 0..T-1 per row); `document_ids` (packed documents, used when
    `attention.documents`). `attention` is the rule the model attends by. `extras` holds
    per-row tensors (B, ...) a task adds: a reference model's log-probabilities, preference
    pair indices; they follow rows through micro-batches, never sequence sharding.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    TOKEN_FIELDS = ("input_ids", "labels", "position_ids", "document_ids")

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, T) True where a label is counted."""
        return self.labels != IGNORE_INDEX

    def positions(self) -> torch.Tensor:
        """(B, T) positions: `position_ids`, or 0..T-1 in every row."""
        if self.position_ids is not None:
            return self.position_ids
        b, t = self.input_ids.shape
        return torch.arange(t, device=self.input_ids.device).expand(b, t)

    def map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A batch with `fn` applied to every (B, T) token tensor (e.g. a sequence shard)."""
        changed = {
            name: fn(getattr(self, name))
            for name in self.TOKEN_FIELDS
            if getattr(self, name) is not None
        }
        return dataclasses.replace(self, **changed)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A batch with `fn` applied along the rows of every tensor (token tensors and extras)."""
        out = self.map_tokens(fn)
        return dataclasses.replace(out, extras={k: fn(v) for k, v in self.extras.items()})

    def to(self, device: torch.device) -> Batch:
        return self.map_rows(lambda t: t.to(device))

    def select(self, rows: torch.Tensor) -> Batch:
        """The rows `rows` (a (R,) index tensor)."""
        return self.map_rows(lambda t: t.index_select(0, rows.to(t.device)))

    def split(self, rows_per_part: int) -> list[Batch]:
        """Consecutive parts of `rows_per_part` rows (micro-batches)."""
        idx = torch.arange(self.rows)
        return [self.select(part) for part in idx.split(rows_per_part)]


class Task(ABC):
    """An objective: batches from the loader's rows, and the summed loss of the counted units.

    `count(batch)` is the number of units `loss_sum` adds up (a scalar tensor); the step divides
    the summed loss by the global count.
    """

    name: str = ""
    data_summary: str = ""  # what `dataset` made of the files, for the log (counts, drops)
    random_tokens: bool = True  # can train on random token ids (`data.random_tokens`)
    attention_kind: str = ""  # the attention rule it trains with, for the log ("": task.attention)
    # The loss reads only the logits of tokens with a label: the step may then compute the
    # output head at those positions alone, as (1, N, vocab) with `labels` (1, N) to match.
    labelled_logits_only: bool = False
    # Trains with the `[tokenizer]` (a language task); False: the task reads its own inputs
    # (the video task's captions go through `[video] text_encoder`).
    uses_tokenizer: bool = True
    # The model splits each sample's tokens over the context-parallel ranks itself (the layout
    # sets its shard): the step leaves the batch whole on every cp rank and counts each rank's
    # share 1/cp of every unit, so the global count is the number of units.
    model_shards_tokens: bool = False

    def __init__(self, cfg, *, tokenizer=None, job=None) -> None:
        self.cfg = cfg  # the `[task]` section
        self.tokenizer = tokenizer  # None when training on random token ids
        self.job = job  # the whole JobConfig, for a task that reads other sections (`[video]`)

    def forward(self, model, batch: Batch, *, logit_rows: torch.Tensor | None = None):
        """The model's output on `batch` (what `loss_sum` scores): a language model's logits
        (B, T, vocab), or (1, N, vocab) at `logit_rows` (B, T) only."""
        return model(
            batch.input_ids,
            batch.position_ids,
            batch.document_ids,
            attention=batch.attention,
            logit_rows=logit_rows,
        )

    def dataset(self, files: list[Path], data_cfg, *, seed: int) -> PackedDataset | RowDataset:
        """What this task trains on, from the data files (`[data]`): by default the packed
        token stream of their documents (`PackedDataset`)."""
        return PackedDataset.from_files(
            files,
            self.tokenizer,
            seq_len=data_cfg.seq_len,
            text_field=data_cfg.text_field,
            seed=seed,
            shuffle=data_cfg.shuffle,
            cache_dir=data_cfg.cache_dir,
        )

    @abstractmethod
    def batch(self, rows: torch.Tensor) -> Batch:
        """This rank's batch from its rows of the dataset: (B, T + 1) token ids, or the
        (B, C, T + 1) channels of a `RowDataset`."""

    def count(self, batch: Batch) -> torch.Tensor:
        """Counted units: tokens with a label."""
        return batch.loss_mask.sum()

    @abstractmethod
    def loss_sum(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The sum of the counted units' losses; logits (B, T, vocab), maybe vocab-sharded."""

    def loss_and_metrics(
        self, logits: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`loss_sum` and sums over the counted units of what the step log reports per unit
        (detached; the step divides them by the global count, like the loss)."""
        return self.loss_sum(logits, batch), {}

    def check_layout(self, dims) -> None:
        """A UserError, before anything is built, for a layout (`ParallelDims`) this task
        cannot run on; every layout by default."""
        return None

    def sample_tokens(self, args, data_cfg) -> tuple[int, int]:
        """(tokens one sample trains on, the attention's length) for throughput and FLOPs:
        `data.seq_len` both for a language task."""
        return data_cfg.seq_len, data_cfg.seq_len

    def check_data(self, files: list[Path]) -> None:
        """A UserError, before launch (no rank, no model), for data files or task settings
        this task cannot use; GRPO imports and probes its reward functions. Nothing by
        default (`dataset` reads the files later)."""
        return None

    def check_model(self, args, dims) -> None:
        """A UserError, before anything is built, for a model (its args) this task cannot train
        on this layout. A language task refuses a video model (one with `forward_tokens`)."""
        from parallm.models.registry import family_of_args

        spec = family_of_args(args)
        if spec.is_video:
            raise UserError(
                f"task.name: {self.name!r} trains a language model, but model.architecture "
                f"{spec.model_types[0]!r} is not one (its task is 'flow')"
            )

    def export_extras(self, path: Path) -> None:
        """Write what the task adds to the exported model directory `path` (rank 0), beside
        the weights: nothing by default (the trainer saves the tokenizer)."""
        return None

    def needs_reference(self) -> bool:
        """Whether the step runs the frozen reference model on each batch first (its logits go
        through `reference_extras` into `Batch.extras`)."""
        return False

    def reference_extras(self, logits: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-row tensors (B, ...) from the reference model's logits on `batch`."""
        raise NotImplementedError(f"task {self.name!r} uses no reference model")


def refuse_degrees(task: str, dims, why: dict[str, str]) -> None:
    """A UserError for the first parallel axis of `why` (its name -> why this task cannot run
    split along it) whose degree in `dims` is above 1."""
    for axis, reason in why.items():
        degree = getattr(dims, axis)
        if degree > 1:
            raise UserError(
                f"parallel.{axis}: {degree} is not supported by task.name={task!r} ({reason}); "
                "valid: 1"
            )


def next_token_loss_sum(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed cross entropy of the counted labels (float32; vocabulary-sharded logits work under
    `loss_parallel`)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        batch.labels.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available as `[task] name = cls.name`."""
    assert cls.name and cls.name not in TASKS, f"task name {cls.name!r} empty or taken"
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    from parallm.config import BUILTIN_TASKS

    for name in BUILTIN_TASKS:  # each registers itself when imported
        importlib.import_module(f"parallm.train.tasks.{name}")
    return sorted(TASKS)


def task_class(name: str) -> type[Task]:
    """The task class registered as `name`, or a UserError listing the known ones."""
    if name not in task_names():
        raise UserError(f"task.name: {name!r} is not valid; valid: {', '.join(task_names())}")
    return TASKS[name]


def make_task(cfg, *, tokenizer=None, job=None) -> Task:
    """The task `cfg.name` names (the `[task]` section; `job`: the whole JobConfig)."""
    return task_class(cfg.name)(cfg, tokenizer=tokenizer, job=job)
