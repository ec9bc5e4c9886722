"""parallm: train, fine-tune and serve transformer models across many devices.

Parallelism changes where the computation runs, never what it computes.

`from parallm import LLM, SamplingParams` (the serving engine's offline API) and
`load_pretrained` / `save_pretrained` (Hugging Face directories) are imported on first use, so
`import parallm` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "LLM": "parallm.inference.llm",
    "SamplingParams": "parallm.inference.sampling",
    "load_pretrained": "parallm.models.hf",
    "save_pretrained": "parallm.models.hf",
}
__all__ = ["LLM", "SamplingParams", "load_pretrained", "save_pretrained"]

if TYPE_CHECKING:
    from parallm.inference.llm import LLM
    from parallm.inference.sampling import SamplingParams
    from parallm.models.hf import load_pretrained, save_pretrained


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parallm' has no attribute {name!r}")
