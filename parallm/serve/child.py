"""Ending a child process of the server (the engine process, the video worker) and its pipe."""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any


def end_child(
    process: Any,
    conn: Connection | None,
    loop: asyncio.AbstractEventLoop | None,
    *,
    wait: float,
    terminate: bool,
) -> None:
    """Stop watching `conn` in `loop` and close it, then give `process` `wait` seconds to exit
    (after a SIGTERM if `terminate`; the child may also be ending of itself) and kill it if it
    has not."""
    if conn is not None:
        if loop is not None and not loop.is_closed():
            loop.remove_reader(conn.fileno())
        conn.close()
    if process is not None:
        if terminate:
            process.terminate()
        process.join(wait)
        if process.is_alive():
            process.kill()
            process.join()
