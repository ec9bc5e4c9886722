"""Optional parts of parallm and the pip extra each needs.

`pip install parallm` trains, generates, plans and benchmarks; the HTTP server, the key store and
`bench serve` need the `serve` extra (FastAPI, uvicorn, SQLAlchemy, ...), the chat page the `ui`
extra (Gradio, plus the server's), video files (`parallm video generate`, video datasets) the
`video` extra (PyAV, imageio). A command that needs a missing extra says which, in one line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from parallm.errors import UserError

# Top-level modules installed only by an extra (import names, not distribution names).
OPTIONAL_MODULES = frozenset(
    {
        "fastapi",
        "starlette",
        "uvicorn",
        "sqlalchemy",
        "prometheus_client",
        "httpx",
        "pydantic",
        "matplotlib",
        "gradio",
        "av",
        "imageio",
    }
)


def import_extra(module: str, *, command: str, extra: str) -> ModuleType:
    """Import `module`; when a module of an extra is missing, a UserError naming the command and
    the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or "").partition(".")[0]
        if missing not in OPTIONAL_MODULES:
            raise
        raise UserError(
            f"{command} needs the {extra} extra ({missing} is not installed): "
            f"pip install 'parallm[{extra}]'"
        ) from None
