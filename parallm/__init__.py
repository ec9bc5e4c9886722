"""parallm: train, fine-tune and serve transformer models across many devices.

Parallelism changes where the computation runs, never what it computes.
"""

from parallm.models.hf import load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
