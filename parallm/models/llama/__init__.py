from parallm.models.llama.model import AttentionBackend, KVCache, ModelArgs, Transformer

__all__ = ["AttentionBackend", "KVCache", "ModelArgs", "Transformer"]
