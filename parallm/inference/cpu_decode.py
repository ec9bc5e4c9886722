"""Decode attention that reads the paged KV cache in place, for float32 on a CPU.

The portable backend gathers each sequence's whole context out of the pool into a padded
tensor, then SDPA reads that copy: the cache is read twice and written once per step and layer.
vLLM's CPU backend avoids this with a C++ paged-attention kernel; this is the same idea for the
decode rows of a step (one new token per sequence), which are most of a serving step:

    for each sequence b (in parallel), each query head h, its KV head g = h / (Hq / Hkv):
        s_j = scale * q[b, h] . K[slot(b, j), g]     j over b's context (or its window)
        out[b, h] = sum_j softmax(s)_j V[slot(b, j), g]

A slot's K (and V) rows for every head are one contiguous run, read straight from the pool once
per sequence, with every query head that uses them. Sums run in another order than SDPA's, so
results equal the portable path up to float32 rounding (tests: within 1e-5; greedy tokens
equal). Positions go four at a time: on the development VM (2 threads, 64 sequences of 128
positions; 16 of 512) 401 -> 318 and 461 -> 372 us a call against one at a time. Prefetching
the rows of the blocks ahead was faster alone (64 x ~280 positions in blocks spread over a
32 MiB pool: 1308 -> 1068 us) but not in the engine, whose blocks are mostly in order: left out.

The kernel is C compiled at first use with the system's C compiler (`cc`, -O3 for the host CPU,
OpenMP over sequences on torch's own OpenMP runtime, which the process has loaded already)
into a cache directory ($PARALLM_KERNEL_CACHE, else ~/.cache/parallm/kernels), keyed by the
source, the flags and the CPU. Without a compiler, or if the build fails, `load()`
returns None once with a warning, and the portable path serves every step.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* out[tokens[b]] = attention of q[tokens[b]] (Hq x D) over positions [start_b, lengths[b]) of
   sequence b, whose position j lives in cache slot slots[b * max_ctx + j]; K and V caches are
   (slots, Hkv, D) row-major, so a slot's rows for every head are one contiguous run; start_b =
   lengths[b] - window when window > 0, else 0. Query head h uses KV head h / (Hq / Hkv).
   Positions go four at a time (four dot products per query load, four V rows per update of
   the sums). Returns 0, or -1 if scratch memory could not be had (out is then incomplete). */
int paged_decode(const float *q, float *out, const float *kc, const float *vc,
                 const int64_t *tokens, const int64_t *slots, const int64_t *lengths,
                 int64_t n_seq, int64_t max_ctx, int64_t hq, int64_t hkv, int64_t d,
                 int64_t window, float scale, int n_threads) {
    const int64_t r = hq / hkv, row = hkv * d;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (int64_t b = 0; b < n_seq; b++) {
        const int64_t len = lengths[b];
        const int64_t start = (window > 0 && len > window) ? len - window : 0;
        const int64_t n = len - start;
        const int64_t *slot = slots + b * max_ctx + start;
        const float *qb = q + tokens[b] * hq * d;
        float *ob = out + tokens[b] * hq * d;
        /* scores (Hq, n), then the running sums (Hq, D) */
        float *s = malloc(sizeof(float) * (size_t)(hq * n + hq * d));
        if (s == NULL) {
            #pragma omp atomic write
            failed = 1;
            continue;
        }
        float *acc = s + hq * n;
        for (int64_t i = 0; i < hq * d; i++) acc[i] = 0.0f;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            const float *k0 = kc + slot[j] * row, *k1 = kc + slot[j + 1] * row;
            const float *k2 = kc + slot[j + 2] * row, *k3 = kc + slot[j + 3] * row;
            for (int64_t h = 0; h < hq; h++) {
                const int64_t o = (h / r) * d;
                const float *qh = qb + h * d;
                float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
                #pragma omp simd reduction(+:d0, d1, d2, d3)
                for (int64_t e = 0; e < d; e++) {
                    const float x = qh[e];
                    d0 += x * k0[o + e];
                    d1 += x * k1[o + e];
                    d2 += x * k2[o + e];
                    d3 += x * k3[o + e];
                }
                float *sh = s + h * n + j;
                sh[0] = d0 * scale;
                sh[1] = d1 * scale;
                sh[2] = d2 * scale;
                sh[3] = d3 * scale;
            }
        }
        for (; j < n; j++) {
            const float *krow = kc + slot[j] * row;
            for (int64_t h = 0; h < hq; h++) {
                const float *qh = qb + h * d, *kh = krow + (h / r) * d;
                float dot = 0.0f;
                #pragma omp simd reduction(+:dot)
                for (int64_t e = 0; e < d; e++) dot += qh[e] * kh[e];
                s[h * n + j] = dot * scale;
            }
        }
        for (int64_t h = 0; h < hq; h++) {
            float *sh = s + h * n, top = -FLT_MAX, sum = 0.0f;
            for (int64_t i = 0; i < n; i++) top = sh[i] > top ? sh[i] : top;
            #pragma omp simd reduction(+:sum)
            for (int64_t i = 0; i < n; i++) {
                sh[i] = expf(sh[i] - top);
                sum += sh[i];
            }
            const float inv = 1.0f / sum;
            for (int64_t i = 0; i < n; i++) sh[i] *= inv;
        }
        for (j = 0; j + 4 <= n; j += 4) {
            const float *v0 = vc + slot[j] * row, *v1 = vc + slot[j + 1] * row;
            const float *v2 = vc + slot[j + 2] * row, *v3 = vc + slot[j + 3] * row;
            for (int64_t h = 0; h < hq; h++) {
                const int64_t o = (h / r) * d;
                const float *sh = s + h * n + j;
                const float p0 = sh[0], p1 = sh[1], p2 = sh[2], p3 = sh[3];
                float *ah = acc + h * d;
                #pragma omp simd
                for (int64_t e = 0; e < d; e++)
                    ah[e] += p0 * v0[o + e] + p1 * v1[o + e] + p2 * v2[o + e] + p3 * v3[o + e];
            }
        }
        for (; j < n; j++) {
            const float *vrow = vc + slot[j] * row;
            for (int64_t h = 0; h < hq; h++) {
                const float p = s[h * n + j], *vh = vrow + (h / r) * d;
                float *ah = acc + h * d;
                #pragma omp simd
                for (int64_t e = 0; e < d; e++) ah[e] += p * vh[e];
            }
        }
        for (int64_t i = 0; i < hq * d; i++) ob[i] = acc[i];
        free(s);
    }
    return failed ? -1 : 0;
}
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    root = os.environ.get("PARALLM_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "parallm" / "kernels"


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "\n".join(lines)


def _build(path: Path) -> None:
    """Compile SOURCE into `path` (via a private temporary file, then an atomic rename)."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        src, lib = Path(tmp) / "paged_decode.c", Path(tmp) / path.name
        src.write_text(SOURCE)
        done = subprocess.run(
            [cc, *FLAGS, str(src), "-o", str(lib), "-lm"], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(lib, path)


@cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built."""
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"paged_decode-{key}.so"
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("paged decode kernel unavailable, using gather + SDPA instead: %s", e)
        return None
    fn = lib.paged_decode
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]
    return lib


def usable(cache: torch.Tensor) -> bool:
    """Whether the kernel serves this (slots, Hkv, D) cache: float32 on a CPU, contiguous, and
    the kernel builds here."""
    return (
        cache.device.type == "cpu"
        and cache.dtype == torch.float32
        and cache.is_contiguous()
        and load() is not None
    )


def paged_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tokens: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    window: int | None,
) -> None:
    """Write into `out` (N, Hq, D) the attention of the rows `tokens` (G,) of `q` (N, Hq, D)
    over their contexts: `lengths` (G,) positions each, position j of row b in cache slot
    `slots[b, j]` (G, max_ctx); causal, within the last `window` positions when given. All
    float32 and contiguous on the CPU; the caches (slots, Hkv, D)."""
    lib = load()
    assert lib is not None, "check usable() first"
    _, hq, d = q.shape
    hkv = k_cache.shape[1]
    assert hq % hkv == 0, f"{hq} query heads over {hkv} KV heads"
    for t in (q, out, k_cache, v_cache, tokens, slots, lengths):
        assert t.is_contiguous(), "paged_decode needs contiguous tensors"
    assert tokens.dtype == slots.dtype == lengths.dtype == torch.int64
    status = lib.paged_decode(
        q.data_ptr(),
        out.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tokens.data_ptr(),
        slots.data_ptr(),
        lengths.data_ptr(),
        tokens.shape[0],
        slots.shape[1],
        hq,
        hkv,
        d,
        window or 0,
        d**-0.5,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("paged_decode: no memory for a sequence's attention scores")
