"""A throwaway PostgreSQL server for the key-store tests: $PARALLM_TEST_POSTGRES_URL when set,
else a fresh cluster from Debian's `postgresql` package (initdb + pg_ctl on a free loopback
port, trust authentication, removed afterwards), else None."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from parallm.testing.timeouts import scaled
from tests.serve_helpers import free_port


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(initdb: str) -> int:
    version = Path(initdb).parent.parent.name
    return int(version) if version.isdigit() else 0


@contextmanager
def postgres_url() -> Iterator[str | None]:
    """A SQLAlchemy URL of an empty database, or None when no server can be had."""
    if url := os.environ.get("PARALLM_TEST_POSTGRES_URL"):
        yield url
        return
    pg_bin = _pg_bin()
    if pg_bin is None:
        yield None
        return
    # PostgreSQL refuses to run as root: then the cluster belongs to the `postgres` user, in a
    # directory that user can enter.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="parallm-pg-"))
    root.chmod(0o777)
    data, port = root / "data", free_port()

    def run(*cmd: str) -> None:
        subprocess.run(as_user + list(cmd), check=True, capture_output=True, timeout=scaled(120))

    try:
        run(str(pg_bin / "initdb"), "-D", str(data), "-U", "parallm", "--auth=trust", "-E", "UTF8")
        options = f"-h 127.0.0.1 -p {port} -k {root}"
        run(
            str(pg_bin / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(root / "log"),
            "-o",
            options,
            "start",
        )
        try:
            yield f"postgresql+psycopg://parallm@127.0.0.1:{port}/postgres"
        finally:
            run(str(pg_bin / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)
