"""Parity of parallm's STDiT3 (parallm/models/stdit/model.py) with Open-Sora v1.2's own STDiT3.

Run:  cd WORK && venv/bin/python compare.py [--dtypes float32,float64] [--modes sd,hf]
      [--cases a,b] [--acts]
Two interpreters: this venv (Open-Sora v1.2 code at tag v1.2.0 in src/, shims listed in
README.md) writes weights/inputs/reference outputs to work/<case>/; parallm's .venv/bin/python
runs par_side.py on the same files; this script compares. --acts prints per-intermediate errors.
"""

import argparse
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cases import CASES  # noqa: E402

ORDER = ["fps_embedder", "t_embedder", "t_block", "y_embedder", "x_embedder", "spatial_blocks.0.in"]


def err(a, b):
    if a.shape != b.shape:
        return f"SHAPE {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--modes", default="sd,hf")
    ap.add_argument("--cases", default="")
    ap.add_argument("--acts", action="store_true")
    ap.add_argument(
        "--parallm", required=True, help="the parallm checkout (its .venv runs par_side.py)"
    )
    ap.add_argument(
        "--f64-exact",
        action="store_true",
        help="float64 runs only: two test-only runtime patches that remove float64-only precision "
        "differences (parallm's 2-D position embedding made in float64 as Open-Sora's is under "
        ".double(); Open-Sora's softmax kept in float64 instead of its float32 cast)",
    )
    a = ap.parse_args()
    work = os.path.join(HERE, "work")
    cases = a.cases.split(",") if a.cases else list(CASES)
    env = dict(
        os.environ, PYTHONPATH=os.path.join(HERE, "src"), F64_SOFTMAX="1" if a.f64_exact else "0"
    )
    worst = 0.0
    for dt in a.dtypes.split(","):
        r = subprocess.run(
            [sys.executable, os.path.join(HERE, "ref_side.py"), work, dt, ",".join(cases)],
            env=env,
            capture_output=True,
            text=True,
        )
        if a.acts or "FAILED" in r.stdout:
            print(r.stdout, r.stderr[-2000:])
        for mode in a.modes.split(","):
            p = subprocess.run(
                [
                    os.path.join(a.parallm, ".venv/bin/python"),
                    os.path.join(HERE, "par_side.py"),
                    work,
                    mode,
                    dt,
                    ",".join(cases),
                ],
                cwd=a.parallm,
                capture_output=True,
                text=True,
                env=dict(os.environ, F64_POSEMB="1" if a.f64_exact else "0"),
            )
            if "FAILED" in p.stdout:
                print(p.stdout, p.stderr[-3000:])
            print(
                f"== {dt}, parallm loaded via {'load_pretrained(hf dir)' if mode == 'hf' else 'load_state_dict(strict)'}"
            )
            for c in cases:
                d = os.path.join(work, c)
                try:
                    ref = torch.load(os.path.join(d, f"ref_{dt}.pt"))
                    par = torch.load(os.path.join(d, f"par_{mode}_{dt}.pt"))
                except FileNotFoundError as e:
                    print(f"  {c:28s} missing {e.filename}")
                    continue
                e = err(ref["out"], par["out"])
                scale = ref["out"].abs().max().item()
                worst = max(worst, e) if isinstance(e, float) else float("inf")
                extra = f"  [{par['info']}]" if mode == "hf" else ""
                if dt == "float64":
                    fl = max(
                        err(x, y)
                        for x, y in zip(
                            ref["acts"]["final_layer"], par["acts"]["final_layer"], strict=False
                        )
                    )
                    extra = f"  final_layer(f64, pre-cast) {fl:.2e}" + extra
                    worst = max(worst, fl)
                print(
                    f"  {c:28s} max|diff| {e:.2e}  (max|out| {scale:.2f}, out dtype {par['out'].dtype}){extra}"
                )
                if a.acts or (isinstance(e, float) and e > (1e-4 if dt == "float32" else 1e-5)):
                    names = ORDER + sorted(
                        k for k in ref["acts"] if "blocks" in k and not k.endswith(".in")
                    )
                    names.sort(
                        key=lambda n: (
                            (
                                ORDER.index(n)
                                if n in ORDER
                                else 10 + int(n.split(".")[1]) * 2 + ("temporal" in n)
                            )
                            if "final" not in n
                            else 999
                        )
                    )
                    names += ["final_layer"]
                    for n in names:
                        rv, pv = ref["acts"].get(n), par["acts"].get(n)
                        if rv is None or pv is None:
                            print(
                                f"      {n:24s} missing ref={rv is not None} par={pv is not None}"
                            )
                            continue
                        es = [err(x, y) for x, y in zip(rv, pv, strict=False)]
                        print(
                            f"      {n:24s} "
                            + " ".join(f"{x:.2e}" if isinstance(x, float) else x for x in es)
                            + ("" if len(rv) == len(pv) else f" calls ref={len(rv)} par={len(pv)}")
                        )
    print(f"worst max|diff| over all: {worst:.2e}")


if __name__ == "__main__":
    main()
