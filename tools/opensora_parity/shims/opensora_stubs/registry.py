# SHIM (not Open-Sora code): opensora/registry.py needs mmengine; only MODELS.register_module is used
# by stdit3.py (a decorator that registers a builder by name). No effect on the forward pass.
class _Registry:
    def __init__(self):
        self.modules = {}

    def register_module(self, name):
        def deco(fn):
            self.modules[name] = fn
            return fn

        return deco


MODELS = _Registry()
