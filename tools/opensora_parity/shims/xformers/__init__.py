# SHIM (not xformers): only what Open-Sora v1.2 blocks.py uses (MultiHeadCrossAttention).
from . import ops  # noqa: F401
