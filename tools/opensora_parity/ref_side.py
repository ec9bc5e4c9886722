"""Open-Sora v1.2 side (run with WORK/venv/bin/python, PYTHONPATH=src; see README.md):
builds random weights + inputs for every case, saves them (an HF dir per case + inputs.pt) and
the original STDiT3's output and intermediate activations."""

import json
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import BASE_MODEL, CASES  # noqa: E402
from opensora.models.stdit.stdit3 import STDiT3, STDiT3Config  # noqa: E402

SCALES = [0.5, 1.0, 1.7]

if os.environ.get("F64_SOFTMAX") == "1":
    # TEST-ONLY runtime patch for float64 runs (--f64-exact): Open-Sora's Attention.forward
    # casts the attention logits to float32 for the softmax ("translate attn to float32"), which
    # under model.double() is a downcast (~1e-7); parallm's SDPA keeps float64. The patch keeps
    # float64 there and changes nothing else (float32 runs are unaffected either way).
    import inspect
    import textwrap

    import opensora.models.layers.blocks as _blocks

    _src = textwrap.dedent(inspect.getsource(_blocks.Attention.forward))
    assert _src.count("attn = attn.to(torch.float32)") == 1
    _src = _src.replace(
        "attn = attn.to(torch.float32)",
        "attn = attn.to(torch.promote_types(attn.dtype, torch.float32))",
    )
    _ns = {}
    exec(compile(_src, "patched_Attention_forward", "exec"), _blocks.__dict__, _ns)
    _blocks.Attention.forward = _ns["forward"]


def random_weights(model, gen, perturb_rope=False):
    """Every tensor non-zero, several scales (cycled per tensor)."""
    sd = model.state_dict()
    out = {}
    for i, (name, p) in enumerate(sd.items()):
        s = SCALES[i % len(SCALES)]
        shape = p.shape
        if name == "rope.freqs":
            v = p.clone()
            if perturb_rope:
                v = v * (1 + 0.3 * torch.rand(shape, generator=gen))
        elif name.endswith("norm.weight"):
            v = 1 + 0.3 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            v = 0.1 * s * torch.randn(shape, generator=gen)
        elif name.endswith("scale_shift_table"):
            v = 0.3 * s * torch.randn(shape, generator=gen)
        elif name == "y_embedder.y_embedding":
            v = torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            v = s * torch.randn(shape, generator=gen) / fan_in**0.5
        v = torch.where(v == 0, torch.full_like(v, 0.01), v)  # randn can return an exact 0
        assert (v != 0).all(), name
        out[name] = v.float().contiguous()
    return out


def make_inputs(cfg, spec, gen):
    B, T, H, W = spec["B"], spec["T"], spec["H"], spec["W"]
    L = cfg["model_max_length"]
    inp = {
        "x": torch.randn(B, cfg["in_channels"], T, H, W, generator=gen),
        "timestep": torch.tensor(spec["t"], dtype=torch.float32),
        "y": torch.randn(B, 1, L, cfg["caption_channels"], generator=gen),
        "fps": torch.tensor(spec["fps"], dtype=torch.float32),
        "height": torch.tensor(spec["height"], dtype=torch.float32),
        "width": torch.tensor(spec["width"], dtype=torch.float32),
    }
    if spec.get("lens") is not None:
        inp["mask"] = torch.tensor(spec["lens"], dtype=torch.long)
    if spec.get("drop") is not None:
        inp["drop_caption"] = torch.tensor(spec["drop"], dtype=torch.bool)
    if spec.get("x_mask") is not None:
        inp["x_mask"] = torch.tensor(spec["x_mask"], dtype=torch.bool)
    return inp


class Recorder:
    """Forward hooks: module outputs in call order, and block 0's input."""

    def __init__(self, model, names):
        self.acts = {}
        mods = dict(model.named_modules())
        for n in names:
            mods[n].register_forward_hook(self._hook(n))
        mods["spatial_blocks.0"].register_forward_pre_hook(self._pre("spatial_blocks.0.in"))

    def _hook(self, name):
        def f(mod, args, out):
            self.acts.setdefault(name, []).append(out.detach().clone())

        return f

    def _pre(self, name):
        def f(mod, args):
            self.acts.setdefault(name, []).append(args[0].detach().clone())

        return f


def run_case(name, outdir, dtype):
    over, spec = CASES[name]
    cfg = dict(BASE_MODEL)
    perturb = over.pop("_perturb_rope", False) if "_perturb_rope" in over else False
    over = {k: v for k, v in over.items() if not k.startswith("_")}
    cfg.update(over)
    torch.manual_seed(0)
    model = STDiT3(STDiT3Config(**cfg)).eval()
    gen = torch.Generator().manual_seed(1234)
    weights = random_weights(model, gen, perturb_rope=perturb)
    missing, unexpected = model.load_state_dict(weights, strict=True)
    inp = make_inputs(cfg, spec, gen)
    d = os.path.join(outdir, name)
    os.makedirs(os.path.join(d, "hf"), exist_ok=True)
    # HF directory as Open-Sora's hub checkpoint has it: config.json of STDiT3Config + safetensors
    hf_cfg = dict(STDiT3Config(**cfg).to_dict())
    hf_cfg.update(model_type="STDiT3", architectures=["STDiT3"], torch_dtype="float32")
    hf_cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in hf_cfg.items()}
    with open(os.path.join(d, "hf", "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=1, default=str)
    save_file(weights, os.path.join(d, "hf", "model.safetensors"))
    torch.save(inp, os.path.join(d, "inputs.pt"))

    model = model.to(dtype)
    names = ["t_embedder", "fps_embedder", "t_block", "y_embedder", "x_embedder", "final_layer"]
    names += [f"{k}_blocks.{i}" for i in range(cfg["depth"]) for k in ("spatial", "temporal")]
    rec = Recorder(model, names)
    with torch.no_grad():
        kw = {k: v for k, v in inp.items() if k not in ("x", "timestep", "y", "drop_caption")}
        y = inp["y"].to(dtype)
        if (
            "drop_caption" in inp
        ):  # CaptionEmbedder.token_drop with force_drop_ids (the training path)
            y = model.y_embedder.token_drop(y, force_drop_ids=inp["drop_caption"].long())
        out = model(inp["x"].to(dtype), inp["timestep"].to(dtype), y, **kw)
        out2 = model(inp["x"].to(dtype), inp["timestep"].to(dtype), y, **kw)
    det = (out - out2).abs().max().item()
    acts = {k: v[0] if len(v) == 1 else v[: len(v) // 2] for k, v in rec.acts.items()}  # first call
    tag = str(dtype).split(".")[-1]
    torch.save({"out": out, "acts": acts}, os.path.join(d, f"ref_{tag}.pt"))
    return out, det


if __name__ == "__main__":
    outdir = sys.argv[1]
    dtype = getattr(torch, sys.argv[2]) if len(sys.argv) > 2 else torch.float32
    only = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] else list(CASES)
    for name in only:
        try:
            out, det = run_case(name, outdir, dtype)
            print(
                f"{name}: ref out {tuple(out.shape)} |out|max {out.abs().max():.3g} rerun-diff {det:.1e}"
            )
        except Exception as e:  # report, continue
            print(f"{name}: REF FAILED {type(e).__name__}: {e}")
