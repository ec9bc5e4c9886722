import shim_timm  # noqa: F401  (see shim_timm.py)
