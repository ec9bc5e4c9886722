"""Per-key requests-per-minute and tokens-per-minute limits over a sliding 60-second window.

What counts:
- A request counts once toward RPM when `check` admits it. Refused requests count toward nothing.
- Tokens are prompt + completion tokens. The completion's length is unknown at admission, so the
  server reserves an estimate with `check` (prompt tokens + the request's ``max_tokens``) and, when
  the request finishes, replaces it with the actual prompt + completion count through `commit`.
- Both are charged at admission time and leave the window 60 s later. A request whose reservation
  already left the window when it finishes (it ran longer than the window) is charged whatever it
  used beyond the reservation at finishing time.

`commit` finds the reservation by key and reserved amount (the oldest open one of that size), since
the server holds no other handle. Two concurrent requests of one key with the same estimate may
thus swap corrections: the totals stay exact, only the moment a correction leaves the window can
shift, by at most the gap between their admissions.

The state is in memory and per process: every server process enforces the full limits on its own.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from parallm.errors import UserError
from parallm.serve.keystore import KeyInfo

WINDOW_S = 60.0


@dataclass
class _Charge:
    at: float  # clock time of admission
    tokens: int
    open: bool  # a reservation from `check` that `commit` has not corrected yet


@dataclass
class _Window:
    charges: deque[_Charge] = field(default_factory=deque)  # in admission order
    tokens: int = 0  # sum of charges[*].tokens


class RateLimiter:
    """Admits or refuses requests per key; thread-safe.

    `clock` returns seconds on a monotonic scale (``time.monotonic`` by default; tests inject one).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def check(self, key: KeyInfo, estimated_tokens: int) -> float | None:
        """None if the request is admitted (and its tokens reserved); otherwise the seconds until
        a retry could succeed, for the HTTP ``Retry-After`` header.

        A request estimated above the key's whole TPM limit could never succeed: UserError.
        """
        if (
            isinstance(estimated_tokens, bool)
            or not isinstance(estimated_tokens, int)
            or estimated_tokens < 0
        ):
            raise UserError(
                f"estimated_tokens: {estimated_tokens!r} is not valid; must be an integer >= 0"
            )
        if key.tpm is not None and estimated_tokens > key.tpm:
            raise UserError(
                f"estimated_tokens: {estimated_tokens} is over key {key.id}'s limit of {key.tpm} "
                "tokens per minute; lower max_tokens or shorten the prompt"
            )
        if key.rpm is None and key.tpm is None:
            return None  # nothing to enforce, nothing to remember
        with self._lock:
            now = self._clock()
            window = self._windows.setdefault(key.id, _Window())
            _expire(window, now)
            charges = window.charges
            wait = 0.0
            if key.rpm is not None and len(charges) >= key.rpm:
                # One more fits once len - rpm + 1 charges have left, i.e. when this one leaves.
                wait = charges[len(charges) - key.rpm].at + WINDOW_S - now
            if key.tpm is not None and window.tokens + estimated_tokens > key.tpm:
                excess = window.tokens + estimated_tokens - key.tpm
                # Both conditions only improve as time passes, so the later of the two waits is exact.
                for charge in charges:
                    excess -= charge.tokens
                    if excess <= 0:
                        wait = max(wait, charge.at + WINDOW_S - now)
                        break
                assert excess <= 0, "estimated_tokens <= tpm, so an empty window always fits"
            if wait > 0:
                return wait
            charges.append(_Charge(at=now, tokens=estimated_tokens, open=True))
            window.tokens += estimated_tokens
            return None

    def commit(self, key_id: str, actual_tokens: int, reserved_tokens: int) -> None:
        """Replace a reservation of `reserved_tokens` made by `check` with the request's actual
        prompt + completion tokens, once it has finished (or failed: pass what it used)."""
        for name, value in (("actual_tokens", actual_tokens), ("reserved_tokens", reserved_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name}: {value!r} is not valid; must be an integer >= 0")
        with self._lock:
            window = self._windows.get(key_id)
            if window is None:
                return  # a key without limits: `check` kept no state for it
            now = self._clock()
            _expire(window, now)
            charge = next(
                (c for c in window.charges if c.open and c.tokens == reserved_tokens), None
            )
            if charge is not None:
                charge.open = False
                window.tokens += actual_tokens - charge.tokens
                charge.tokens = actual_tokens
            elif actual_tokens > reserved_tokens:
                # The reservation has left the window already; charge the overrun from now on.
                window.charges.append(
                    _Charge(at=now, tokens=actual_tokens - reserved_tokens, open=False)
                )
                window.tokens += actual_tokens - reserved_tokens


def _expire(window: _Window, now: float) -> None:
    """Drop the charges admitted `WINDOW_S` or more before `now`."""
    charges = window.charges
    while charges and now - charges[0].at >= WINDOW_S:
        window.tokens -= charges.popleft().tokens
