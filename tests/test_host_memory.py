"""The engine keeps freed host memory for reuse on a CPU, unless the user chose an allocator."""

import os
import subprocess
import sys

PROBE = (
    "import parallm.inference.host_memory as h, sys; sys.stdout.write(str(h.keep_freed_memory()))"
)


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_glibc_thresholds_are_raised_in_a_plain_process():
    assert _probe() == "True"


def test_an_allocator_or_tunables_the_user_chose_are_left_alone():
    assert _probe(GLIBC_TUNABLES="glibc.malloc.perturb=0") == "False"
    assert _probe(MALLOC_TRIM_THRESHOLD_="131072") == "False"
