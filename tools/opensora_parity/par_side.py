"""parallm side (run with the parallm checkout's .venv/bin/python from the checkout): loads each case's HF dir
into parallm's STDiT3, runs the same inputs, saves the output and the same intermediates."""

import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import CASES  # noqa: E402


def build(d, mode, dtype):
    from safetensors.torch import load_file

    from parallm.models.stdit.model import STDiT3, STDiTArgs

    if mode == "hf":
        from parallm.models.hf import load_pretrained

        model = load_pretrained(os.path.join(d, "hf"), dtype=dtype)
        # load_pretrained loads with strict=False: check every checkpoint tensor landed
        sd = load_file(os.path.join(d, "hf", "model.safetensors"))
        msd = model.state_dict()
        missing = sorted(set(msd) - set(sd))
        bad = [
            k
            for k in sd
            if k not in msd
            or not torch.equal(msd[k].to(sd[k].dtype).cpu(), sd[k].to(dtype).to(sd[k].dtype))
        ]
        info = f"missing_in_ckpt={missing} mismatched={bad[:5]}"
        return model, info
    cfg = json.load(open(os.path.join(d, "hf", "config.json")))
    fields = STDiTArgs.__dataclass_fields__
    args = STDiTArgs(
        **{k: (tuple(v) if k == "patch_size" else v) for k, v in cfg.items() if k in fields}
    )
    model = STDiT3(args)
    sd = load_file(os.path.join(d, "hf", "model.safetensors"))
    res = model.load_state_dict(sd, strict=True)
    return model.to(dtype).eval(), f"strict load ok {res}"


def f64_position_embedding(hidden, h, w, scale, base_size, device, dtype):
    """TEST-ONLY runtime replacement (float64 runs, --f64-posemb): Open-Sora's PositionEmbedding2D
    under model.double() -- inv_freq and the grid are made in float32, as parallm does, but the
    product and sin/cos run in float64 (its inv_freq buffer became float64). parallm computes them
    in float32 and casts; that alone is a ~2e-7 difference, which would hide everything else."""
    half = hidden // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))).double()
    rows = (torch.arange(h, device=device) / scale * (base_size / h)).double()
    cols = (torch.arange(w, device=device) / scale * (base_size / w)).double()
    col = cols[None, :].expand(h, w).reshape(-1)
    row = rows[:, None].expand(h, w).reshape(-1)

    def sin_cos(v):
        out = v[:, None] * inv_freq[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)

    return torch.cat([sin_cos(col), sin_cos(row)], dim=-1).to(dtype)


def run(d, mode, dtype):
    model, info = build(d, mode, dtype)
    neg = os.environ.get("NEG", "")
    if neg and not getattr(torch, "_neg_applied", False):  # once per process (patches compose)
        torch._neg_applied = (
            True  # negative controls: deliberately wrong parallm variants the check must catch
        )
        import parallm.models.stdit.model as pm

        if neg == "posemb_swap":  # row/column halves of the 2-D position embedding swapped
            orig = pm.position_embedding_2d

            def swapped(hidden, *a):
                e = orig(hidden, *a)
                return torch.cat([e[:, hidden // 2 :], e[:, : hidden // 2]], dim=-1)

            pm.position_embedding_2d = swapped
        elif (
            neg == "rope_half"
        ):  # rotate_half in the split-halves layout instead of interleaved pairs

            def rope_fwd(self, x):
                t = x.shape[1]
                pos = torch.arange(t, dtype=self.freqs.dtype)
                ang = torch.cat([pos[:, None] * self.freqs[None]] * 2, dim=-1)
                x1, x2 = x.chunk(2, dim=-1)
                return x * ang.cos()[:, None] + torch.cat([-x2, x1], dim=-1) * ang.sin()[:, None]

            pm.Rotary.forward = rope_fwd
        elif neg == "final_no_t0":  # final layer ignores the frame mask
            f = pm.FinalLayer.forward
            pm.FinalLayer.forward = lambda self, x, t, x_mask=None, t0=None: f(self, x, t)
    if neg:
        info += f" [NEG={neg}]"
    if dtype == torch.float64 and os.environ.get("F64_POSEMB") == "1":
        import parallm.models.stdit.model as pm

        pm.position_embedding_2d = f64_position_embedding
        info += " [f64 pos-emb patch]"
    acts = {}

    def hook(name, fn=lambda o: o):
        def f(mod, args, out):
            acts.setdefault(name, []).append(fn(out.detach().clone()))

        return f

    mods = dict(model.named_modules())

    def flat(o):
        return o.reshape(o.shape[0], -1, o.shape[-1])  # (B, T, S, C) -> (B, T*S, C)

    for n in ("t_embedder", "fps_embedder", "t_block", "y_embedder"):
        mods[n].register_forward_hook(hook(n))
    mods["x_embedder.proj"].register_forward_hook(
        hook("x_embedder", lambda o: o.flatten(2).transpose(1, 2))
    )
    mods["final_layer"].register_forward_hook(hook("final_layer", flat))
    for n in mods:
        if n.count(".") == 1 and n.split(".")[0] in ("spatial_blocks", "temporal_blocks"):
            mods[n].register_forward_hook(hook(n, flat))
    mods["spatial_blocks.0"].register_forward_pre_hook(
        lambda mod, args: acts.setdefault("spatial_blocks.0.in", []).append(
            flat(args[0].detach().clone())
        )
    )
    inp = torch.load(os.path.join(d, "inputs.pt"))
    kw = {k: v for k, v in inp.items() if k not in ("x", "timestep", "y")}
    with torch.no_grad():
        out = model(inp["x"].to(dtype), inp["timestep"].to(dtype), inp["y"].to(dtype), **kw)
    tag = str(dtype).split(".")[-1]
    torch.save({"out": out, "acts": acts, "info": info}, os.path.join(d, f"par_{mode}_{tag}.pt"))
    return out, info


if __name__ == "__main__":
    outdir, mode = sys.argv[1], sys.argv[2]
    dtype = getattr(torch, sys.argv[3])
    only = sys.argv[4].split(",") if len(sys.argv) > 4 and sys.argv[4] else list(CASES)
    for name in only:
        try:
            out, info = run(os.path.join(outdir, name), mode, dtype)
            print(f"{name}: par[{mode}] out {tuple(out.shape)} {out.dtype} ({info})")
        except Exception as e:
            import traceback

            print(f"{name}: PARALLM FAILED [{mode}] {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
