# SHIM (import plumbing only, no numerics): timm 0.9.16 (Open-Sora v1.2's pin) imports torchvision in
# its package __init__, and PyPI's torchvision is a CUDA build that cannot load next to the CPU torch
# 2.13.0 here. STDiT3 needs only timm's Mlp and DropPath, so this loads timm 0.9.16's own
# timm/layers/mlp.py and drop.py (unmodified) without running timm/__init__.py and
# timm/layers/__init__.py, and exposes them where stdit3.py / blocks.py import them from.
import importlib
import importlib.util
import os
import sys
import types

_spec = importlib.util.find_spec("rotary_embedding_torch")  # any site-packages module: find the dir
_site = os.path.dirname(os.path.dirname(_spec.origin))
_timm_dir = os.path.join(_site, "timm")


def _pkg(name, path):
    m = types.ModuleType(name)
    m.__path__ = [path] if path else []
    sys.modules[name] = m
    return m


_pkg("timm", _timm_dir)
_pkg("timm.layers", os.path.join(_timm_dir, "layers"))
_mlp = importlib.import_module("timm.layers.mlp")
_drop = importlib.import_module("timm.layers.drop")
_pkg("timm.models", None)
_ml = _pkg("timm.models.layers", None)
_ml.DropPath = _drop.DropPath
_vt = _pkg("timm.models.vision_transformer", None)
_vt.Mlp = _mlp.Mlp
