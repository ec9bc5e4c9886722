"""API keys and usage metering, stored in SQLite or PostgreSQL through SQLAlchemy Core.

A key looks like ``sk-parallm-<43 urlsafe characters>`` (32 bytes from `secrets`). It is shown to
its owner once, by `KeyStore.create`, and only its SHA-256 hex digest is stored. A fast unsalted
hash is enough here, unlike for passwords: slow hashes (bcrypt, scrypt) exist to make guessing a
*low-entropy* secret from a leaked digest expensive, but nobody can enumerate 2**256 random keys at
any hash speed, and there are no shared or reused values for a salt to separate. A deterministic
digest also lets `authenticate` find the key with one indexed equality lookup, at microseconds per
request instead of the tens of milliseconds a slow hash would add to every call.

A key may carry the admin scope (`create(..., admin=True)`, `parallm keys create --admin`): it
may also load and unload LoRA adapters on a running server. A database made before scopes
existed gets the column (false for every key) when it is opened.

Every method is synchronous, thread-safe and runs one short transaction: the store owns one engine
whose connection pool is shared by all threads. An asyncio server calls it through
``asyncio.to_thread``. All timestamps are timezone-aware UTC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from parallm.errors import UserError

KEY_PREFIX = "sk-parallm-"
_SHOWN_RANDOM_CHARS = (
    4  # random characters kept for display: `sk-parallm-Ab3x...` (24 bits, harmless)
)
_NAME_MAX = 200


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps the instant (timestamptz). SQLite stores fixed-width text without an offset, so
    values are converted to UTC on the way in (text order is then time order, which `since` relies
    on) and marked UTC on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        assert value.tzinfo is not None, "naive datetimes are ambiguous; pass UTC"
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_metadata = sa.MetaData()

# Only portable types, so the same schema is created on SQLite and PostgreSQL.
_keys = sa.Table(
    "api_keys",
    _metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(_NAME_MAX), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),  # unique => indexed
    sa.Column("prefix", sa.String(32), nullable=False),
    sa.Column("created_at", _UTCDateTime(), nullable=False),
    sa.Column("revoked_at", _UTCDateTime(), nullable=True),
    sa.Column("rpm", sa.Integer(), nullable=True),  # None: unlimited
    sa.Column("tpm", sa.Integer(), nullable=True),
    # Added after the first release: `_add_missing_columns` adds it to older databases.
    sa.Column("admin", sa.Boolean(), nullable=False, server_default=sa.false()),
)

_usage = sa.Table(
    "api_usage",
    _metadata,
    # BIGINT on PostgreSQL; SQLite only autoincrements a column declared exactly INTEGER.
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("key_id", sa.String(16), sa.ForeignKey("api_keys.id"), nullable=False),
    # Unique, so a request retried by the server is never billed twice.
    sa.Column("request_id", sa.String(128), nullable=False, unique=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("endpoint", sa.String(100), nullable=False),
    sa.Column("prompt_tokens", sa.Integer(), nullable=False),
    sa.Column("completion_tokens", sa.Integer(), nullable=False),
    sa.Column("created_at", _UTCDateTime(), nullable=False),
    # Added with video generation (POST /v1/videos bills frames, no tokens): `_add_missing_columns`
    # adds it to older databases.
    sa.Column("video_frames", sa.Integer(), nullable=False, server_default="0"),
    sa.Index("ix_api_usage_key_created", "key_id", "created_at"),
    sa.Index("ix_api_usage_created", "created_at"),
)


@dataclass(frozen=True, kw_only=True)
class KeyInfo:
    """An API key as the server and the CLI see it: never the secret, only its display prefix."""

    id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    rpm: int | None  # requests per minute; None: unlimited
    tpm: int | None  # prompt + completion tokens per minute; None: unlimited
    admin: bool = False  # may load and unload adapters on the server

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, kw_only=True)
class UsageSummary:
    """Exact totals for one key (and, by model, one model: the base or an adapter) over a time
    range."""

    key_id: str
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    model: str | None = None  # set when summed per model
    video_frames: int = 0  # frames of the videos generated (POST /v1/videos)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class KeyStore:
    """API keys and per-request usage records in the database at `url`.

    `url` is a SQLAlchemy URL (``sqlite:///path/keys.db``, ``postgresql://user@host/db``) or a bare
    path to a SQLite file; missing tables (and a SQLite file's parent folder) are created. `clock`
    returns the current aware datetime; tests replace it.
    """

    def __init__(self, url: str, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._engine = _make_engine(url)
        self._clock = clock
        try:
            _metadata.create_all(self._engine)
            _add_missing_columns(self._engine)
        except SQLAlchemyError as e:  # unreachable server, unwritable file, bad credentials
            self._engine.dispose()
            reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise UserError(f"--db: cannot open {self.url}: {reason}") from e

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Close the pooled connections."""
        self._engine.dispose()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(
        self, name: str, rpm: int | None = None, tpm: int | None = None, *, admin: bool = False
    ) -> tuple[KeyInfo, str]:
        """Create a key (with the admin scope if `admin`); return it and its secret, which is not
        stored and cannot be shown again."""
        name = name.strip() if isinstance(name, str) else name
        if not isinstance(name, str) or not name or len(name) > _NAME_MAX:
            raise UserError(f"name: {name!r} is not valid; must be 1 to {_NAME_MAX} characters")
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        for _ in range(3):  # ids have 40 random bits; a collision is retried, not expected
            info = KeyInfo(
                id=_new_key_id(),
                name=name,
                prefix=secret[: len(KEY_PREFIX) + _SHOWN_RANDOM_CHARS],
                created_at=self._clock(),
                revoked_at=None,
                rpm=rpm,
                tpm=tpm,
                admin=bool(admin),
            )
            try:
                with self._engine.begin() as conn:
                    conn.execute(sa.insert(_keys).values(secret_hash=_digest(secret), **vars(info)))
            except IntegrityError:
                continue
            return info, secret
        raise AssertionError("three key id collisions in a row")

    def list(self) -> list[KeyInfo]:
        """All keys, revoked ones included, oldest first."""
        with self._engine.connect() as conn:
            rows = conn.execute(sa.select(_keys).order_by(_keys.c.created_at, _keys.c.id))
            return [_key_info(row) for row in rows]

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key for good; revoking it again keeps the first revocation time."""
        with self._engine.begin() as conn:
            conn.execute(
                sa.update(_keys)
                .where(_keys.c.id == key_id, _keys.c.revoked_at.is_(None))
                .values(revoked_at=self._clock())
            )
            row = conn.execute(sa.select(_keys).where(_keys.c.id == key_id)).one_or_none()
        if row is None:
            raise UserError(
                f"key id: {key_id!r} is not a known key; `parallm keys list` shows them"
            )
        return _key_info(row)

    def authenticate(self, secret: str) -> KeyInfo | None:
        """The active key whose secret this is, or None for an unknown or revoked one."""
        if not isinstance(secret, str) or not secret.startswith(KEY_PREFIX):
            return None  # the prefix is public, so rejecting early reveals nothing
        digest = _digest(secret)
        with self._engine.connect() as conn:
            row = conn.execute(sa.select(_keys).where(_keys.c.secret_hash == digest)).one_or_none()
        # The index lookup compares digests in variable time. That leaks nothing useful: a caller
        # chooses secrets, not digests, so learning how many leading digest characters matched
        # does not bring them closer to a stored key. The final comparison is constant-time anyway.
        if row is None or not hmac.compare_digest(row.secret_hash, digest):
            return None
        return _key_info(row) if row.revoked_at is None else None

    def record_usage(
        self,
        key_id: str,
        *,
        request_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        endpoint: str,
        video_frames: int = 0,
    ) -> None:
        """Record one finished request (a video request: the frames it generated); a
        `request_id` already recorded is refused."""
        for field, count in (
            ("prompt_tokens", prompt_tokens),
            ("completion_tokens", completion_tokens),
            ("video_frames", video_frames),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise UserError(f"{field}: {count!r} is not valid; must be an integer >= 0")
        for field, text in (("request_id", request_id), ("model", model), ("endpoint", endpoint)):
            if not isinstance(text, str) or not text:
                raise UserError(f"{field}: {text!r} is not valid; must be a non-empty string")
        row = dict(
            key_id=key_id,
            request_id=request_id,
            model=model,
            endpoint=endpoint,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            video_frames=video_frames,
            created_at=self._clock(),
        )
        try:
            with self._engine.begin() as conn:
                conn.execute(sa.insert(_usage).values(**row))
        except IntegrityError as e:
            # Work out which constraint failed only on this rare path, portably.
            with self._engine.connect() as conn:
                known = conn.execute(sa.select(_keys.c.id).where(_keys.c.id == key_id)).first()
            if known is None:
                raise UserError(f"key id: {key_id!r} is not a known key") from e
            raise UserError(f"request_id: {request_id!r} is already recorded") from e

    def usage(
        self, since: datetime | None = None, key_id: str | None = None, *, by_model: bool = False
    ) -> list[UsageSummary]:
        """Per-key totals of the requests recorded at or after `since` (all time if None), per
        key and model (the base or an adapter) with `by_model`.

        Keys without requests in the range are left out; `key_id` keeps only that key.
        """
        if since is not None and since.tzinfo is None:
            raise UserError(f"since: {since!r} is not valid; must be timezone-aware (e.g. UTC)")
        u, k = _usage.c, _keys.c
        per_model = [u.model] if by_model else []
        query = (
            sa.select(
                u.key_id,
                k.name,
                *per_model,
                sa.func.count().label("requests"),
                sa.func.sum(u.prompt_tokens).label("prompt_tokens"),
                sa.func.sum(u.completion_tokens).label("completion_tokens"),
                sa.func.sum(u.video_frames).label("video_frames"),
            )
            .join_from(_usage, _keys, u.key_id == k.id)
            .group_by(u.key_id, k.name, k.created_at, *per_model)
            .order_by(k.created_at, u.key_id, *per_model)
        )
        if since is not None:
            query = query.where(u.created_at >= since)
        if key_id is not None:
            query = query.where(u.key_id == key_id)
        with self._engine.connect() as conn:
            rows = conn.execute(query).all()
        # int(): some drivers return SUM as Decimal; token counts are exact integers either way.
        return [
            UsageSummary(
                key_id=r.key_id,
                name=r.name,
                requests=int(r.requests),
                prompt_tokens=int(r.prompt_tokens),
                completion_tokens=int(r.completion_tokens),
                video_frames=int(r.video_frames),
                model=r.model if by_model else None,
            )
            for r in rows
        ]


def _add_missing_columns(engine: Engine) -> None:
    """Bring a database made by an older parallm up to the current schema: `api_keys.admin`
    (false for the keys it has) and `api_usage.video_frames` (0 for the requests it has).
    Another process may add them at the same moment."""
    false = "0" if engine.dialect.name == "sqlite" else "false"
    for table, column, kind in (
        ("api_keys", "admin", f"BOOLEAN NOT NULL DEFAULT {false}"),
        ("api_usage", "video_frames", "INTEGER NOT NULL DEFAULT 0"),
    ):
        if column in {c["name"] for c in sa.inspect(engine).get_columns(table)}:
            continue
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
        except SQLAlchemyError:
            if column not in {c["name"] for c in sa.inspect(engine).get_columns(table)}:
                raise


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_key_id() -> str:
    return "key_" + base64.b32encode(secrets.token_bytes(5)).decode().lower()  # 8 chars a-z2-7


def _check_limit(field: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(f"{field}: {value!r} is not valid; must be an integer >= 1, or unset")


def _key_info(row: Any) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
        rpm=row.rpm,
        tpm=row.tpm,
        admin=bool(row.admin),
    )


def _make_engine(url: str) -> Engine:
    """An engine for `url`, or a UserError naming what is wrong with it."""
    text = url.strip() if isinstance(url, str) else ""
    if not text:
        raise UserError(
            f"--db: {url!r} is not valid; give a SQLite file path or a URL such as "
            "sqlite:///keys.db or postgresql://user@host/dbname"
        )
    try:
        parsed = URL.create("sqlite", database=text) if "://" not in text else make_url(text)
    except ArgumentError as e:
        raise UserError(f"--db: {url!r} is not a valid database URL") from e
    shown = parsed.render_as_string(hide_password=True)
    options: dict[str, Any] = {}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    in_memory = is_sqlite and parsed.database in (None, "", ":memory:")
    if in_memory:
        # One shared connection: with a pool, each connection would see its own empty database.
        options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    elif is_sqlite:
        path = Path(parsed.database or "").expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"--db: cannot create the folder for {str(path)!r}: {e.strerror}"
            ) from e
        parsed = parsed.set(database=str(path))
        # Pooled connections move between threads; `timeout` waits for another writer's lock.
        options = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    else:
        options = {"pool_pre_ping": True}  # survive a database restart between requests
    try:
        engine = sa.create_engine(parsed, **options)
    except NoSuchModuleError as e:
        raise UserError(
            f"--db: {shown} names an unknown database kind; use sqlite or postgresql"
        ) from e
    except ImportError as e:
        raise UserError(
            f"--db: {shown} needs a database driver that is not installed ({e}); install it, "
            "e.g. pip install 'psycopg[binary]' for postgresql+psycopg:// (the default for "
            "postgresql:// in SQLAlchemy 2.1) or psycopg2-binary for postgresql+psycopg2://"
        ) from e
    if is_sqlite:
        sa.event.listen(engine, "connect", _sqlite_pragmas(wal=not in_memory))
    return engine


def _sqlite_pragmas(*, wal: bool) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")  # SQLite ignores REFERENCES unless asked
        if wal:  # readers (authenticate) then never wait for a writer (record_usage)
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    return on_connect


# --- What the CLI prints -------------------------------------------------------------------------


def format_keys(keys: list[KeyInfo]) -> str:
    """A table of keys for `parallm keys list`: ids, names and display prefixes, never secrets."""
    if not keys:
        return "no keys"
    rows = [
        [
            k.id,
            k.name,
            k.prefix + "...",
            _when(k.created_at),
            "active" if k.revoked_at is None else f"revoked {_when(k.revoked_at)}",
            "-" if k.rpm is None else str(k.rpm),
            "-" if k.tpm is None else str(k.tpm),
            "admin" if k.admin else "-",
        ]
        for k in keys
    ]
    headers = ["ID", "NAME", "KEY", "CREATED (UTC)", "STATUS", "RPM", "TPM", "SCOPE"]
    return _table(headers, rows, right={5, 6})


def format_usage(summaries: list[UsageSummary]) -> str:
    """A table of per-key usage for `parallm keys usage` (a MODEL column when summed per model,
    a VIDEO FRAMES column when videos were generated), with a total row when there are
    several."""
    if not summaries:
        return "no usage"
    by_model = summaries[0].model is not None
    videos = any(s.video_frames for s in summaries)

    def counts(s: UsageSummary) -> list[int]:
        numbers = [s.requests, s.prompt_tokens, s.completion_tokens, s.total_tokens]
        return numbers + ([s.video_frames] if videos else [])

    rows = [
        [s.key_id, s.name, *([s.model or ""] if by_model else []), *map(str, counts(s))]
        for s in summaries
    ]
    if len(summaries) > 1:
        totals = [sum(column) for column in zip(*(counts(s) for s in summaries), strict=True)]
        blank = ["", ""] if by_model else [""]
        rows.append(["TOTAL", *blank, *map(str, totals)])
    headers = ["KEY", "NAME", *(["MODEL"] if by_model else [])]
    headers += ["REQUESTS", "PROMPT TOKENS", "COMPLETION TOKENS", "TOTAL TOKENS"]
    headers += ["VIDEO FRAMES"] if videos else []
    first = 3 if by_model else 2
    return _table(headers, rows, right=set(range(first, len(headers))))


def _when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = (
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}  # m is minutes


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """The UTC instant `text` names: ISO date or datetime (naive means UTC), or an age such as
    ``30m``, ``24h``, ``7d``, ``2w`` before `now`."""
    stripped = text.strip()
    try:
        if match := _RELATIVE.fullmatch(stripped.lower()):
            age = timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])
            return (now or _utcnow()).astimezone(UTC) - age
        when = datetime.fromisoformat(stripped)
    except (ValueError, OverflowError):
        raise UserError(
            f"--since: {text!r} is not valid; use an ISO date (2024-05-01), an ISO datetime "
            "(2024-05-01T12:00:00Z) or an age (30m, 24h, 7d, 2w)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
