"""LoRA adapters made with `peft` on tiny random `transformers` models, for the serving tests.

Test-only: `peft` and `transformers` are the references, never run-time dependencies.
"""

from __future__ import annotations

from pathlib import Path

import torch

from parallm.models.hf import load_pretrained, save_state_dict
from parallm.models.peft_format import merge_adapter, read_adapter
from parallm.tokenizer import Tokenizer

# name -> peft LoraConfig fields: two adapters of different ranks, targets and scaling.
ADAPTERS = {
    "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "poet": dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True),
}


def save_peft_adapter(base: Path, out: Path, name: str, seed: int = 0):
    """A peft adapter of kind `name` (ADAPTERS) on the HF model in `base`, with random non-zero
    lora_B (peft starts from B = 0: the base exactly), saved to `out`; returns the peft model."""
    import peft
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    model = peft.get_peft_model(ref, peft.LoraConfig(**ADAPTERS[name]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.save_pretrained(out)
    return model.eval()


def save_merged(base: Path, adapter: Path, out: Path) -> Path:
    """The base model with the adapter folded in (`merge_adapter`), as a HF directory."""
    model = load_pretrained(base, dtype=torch.float32)
    state = merge_adapter(model.state_dict(), read_adapter(adapter, model.args))
    return save_state_dict(state, model.args, out, Tokenizer.from_dir(base))
