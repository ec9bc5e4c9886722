"""Test timeouts that stretch with one setting and with the machine's load.

A fixed timeout that is generous on an idle machine fails when the same tests share the CPUs with
a compile or another suite. Every timeout in the tests goes through `scaled(seconds)`:

    seconds x PARALLM_TEST_TIMEOUT_SCALE x load factor

- `PARALLM_TEST_TIMEOUT_SCALE` (environment, default 1): one knob for slow machines, debuggers and
  sanitizers (e.g. 5). It must be a positive number.
- the load factor is `os.getloadavg()[0] / os.cpu_count()` (runnable processes per core over the
  last minute), at least 1 and at most `MAX_LOAD_FACTOR`: a machine running twice as many
  processes as it has cores gives every test twice as long. It is read when `scaled` is called,
  so a timeout set up while the machine is busy gets the busy machine's allowance.

The result is a bound on a hang, never a speed requirement: tests assert behaviour, and a
timeout only says how long to wait before calling something hung.
"""

from __future__ import annotations

import os

from parallm.errors import UserError

ENV = "PARALLM_TEST_TIMEOUT_SCALE"
MAX_LOAD_FACTOR = 20.0  # a machine 20x oversubscribed still ends a real hang in bounded time


def env_scale() -> float:
    """`PARALLM_TEST_TIMEOUT_SCALE` as a positive float (1 when unset or empty)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UserError(f"{ENV}: {raw!r} is not valid; use a positive number such as 1 or 5")
    return value


def load_factor() -> float:
    """Runnable processes per core over the last minute, clamped to [1, MAX_LOAD_FACTOR]."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 1.0
    cpus = os.cpu_count() or 1
    return min(MAX_LOAD_FACTOR, max(1.0, load / cpus))


def scaled(seconds: float) -> float:
    """`seconds` times the environment's scale times the machine's load factor."""
    return seconds * env_scale() * load_factor()
