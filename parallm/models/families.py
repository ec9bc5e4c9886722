"""The model families and the model types each registers: one line per family.

Read without importing torch or any family, so a job file's `model.architecture` is checked
before anything heavy loads (`parallm train` answers a typo at once). The registry imports the
modules listed here on its first lookup and checks that each registered exactly the model types
given here.
"""

from __future__ import annotations

# The module whose import registers a family -> the model types its spec serves.
FAMILY_MODULES: dict[str, tuple[str, ...]] = {
    "parallm.models.llama": ("llama", "mistral", "qwen2", "qwen3"),
    "parallm.models.stdit": ("STDiT3",),
}


def model_types() -> list[str]:
    """Every model type of the listed families, sorted."""
    return sorted(t for types in FAMILY_MODULES.values() for t in types)
