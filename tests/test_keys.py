"""API keys, usage metering and rate limits: SQLite in tmp_path, PostgreSQL when one is given."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from parallm.errors import UserError
from parallm.serve.keystore import (
    KEY_PREFIX,
    KeyInfo,
    KeyStore,
    UsageSummary,
    format_keys,
    format_usage,
    parse_since,
)
from parallm.serve.ratelimit import RateLimiter
from tests.pg_helpers import postgres_url

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A settable clock: a datetime for KeyStore, seconds for RateLimiter."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


class Seconds:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def store(tmp_path: Path):
    with KeyStore(str(tmp_path / "keys.db")) as s:
        yield s


def _record(store: KeyStore, key_id: str, request_id: str, prompt: int, completion: int) -> None:
    store.record_usage(
        key_id,
        request_id=request_id,
        model="tiny",
        prompt_tokens=prompt,
        completion_tokens=completion,
        endpoint="/v1/chat/completions",
    )


def test_secret_authenticates_and_is_never_stored(tmp_path: Path):
    db = tmp_path / "sub" / "keys.db"  # the parent folder is created
    with KeyStore(f"sqlite:///{db}") as store:
        info, secret = store.create("alice", rpm=60, tpm=1000)
        random_part = secret.removeprefix(KEY_PREFIX)
        assert secret.startswith(KEY_PREFIX) and len(random_part) == 43
        assert info.id.startswith("key_") and len(info.id) == 12
        assert info.prefix == secret[: len(KEY_PREFIX) + 4]
        assert (info.name, info.rpm, info.tpm, info.active) == ("alice", 60, 1000, True)
        assert info.created_at.tzinfo is not None
        assert store.authenticate(secret) == info
        _record(store, info.id, "req-1", 3, 4)
    # The WAL and shared-memory files count too: rows may sit there before a checkpoint.
    raw = b"".join(p.read_bytes() for p in db.parent.iterdir())
    assert b"alice" in raw  # the right files were read
    assert secret.encode() not in raw
    assert random_part.encode() not in raw
    assert random_part[4:].encode() not in raw  # nor anything past the displayed prefix
    with KeyStore(str(db)) as reopened:  # a bare path means the same SQLite file
        assert reopened.authenticate(secret) == info


def test_wrong_secrets_do_not_authenticate(store: KeyStore):
    _, secret = store.create("bob")
    assert store.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert store.authenticate(KEY_PREFIX + "x" * 43) is None
    assert store.authenticate(secret.removeprefix(KEY_PREFIX)) is None
    assert store.authenticate("") is None


def test_revoke(store: KeyStore):
    clock = Clock()
    store._clock = clock
    info, secret = store.create("carol")
    other, other_secret = store.create("dave")
    clock.now = T0 + timedelta(hours=1)
    revoked = store.revoke(info.id)
    assert revoked.revoked_at == T0 + timedelta(hours=1) and not revoked.active
    assert store.authenticate(secret) is None
    assert store.authenticate(other_secret) == other
    clock.now = T0 + timedelta(hours=2)
    assert store.revoke(info.id).revoked_at == T0 + timedelta(hours=1)  # idempotent
    with pytest.raises(UserError, match="key_nope"):
        store.revoke("key_nope")


def test_list_shows_prefix_not_secret(store: KeyStore):
    a, secret_a = store.create("alpha", rpm=10)
    b, secret_b = store.create("beta", tpm=5000)
    store.revoke(b.id)
    keys = store.list()
    assert [k.id for k in keys] == [a.id, b.id]
    assert keys[0].active and not keys[1].active
    table = format_keys(keys)
    for needle in (a.id, b.id, "alpha", "beta", a.prefix, b.prefix, "revoked", "5000"):
        assert needle in table
    assert secret_a not in table and secret_b not in table
    assert secret_a.removeprefix(KEY_PREFIX) not in table
    assert format_keys([]) == "no keys"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": ""}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "ok", "rpm": -1}, "rpm: -1"),
        ({"name": "ok", "rpm": 0}, "rpm: 0"),
        ({"name": "ok", "tpm": -5}, "tpm: -5"),
        ({"name": "ok", "tpm": 2.5}, "tpm: 2.5"),
    ],
)
def test_create_validation(store: KeyStore, kwargs: dict, needle: str):
    with pytest.raises(UserError, match=needle):
        store.create(**kwargs)


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("", "--db"),
        ("nosuchdb://host/x", "nosuchdb"),
        ("postgresql+nosuchdriver://user:hunter2@h/x", "nosuchdriver"),
        ("{tmp}/a-file/keys.db", "a-file"),
    ],
)
def test_bad_urls(tmp_path: Path, url: str, needle: str):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UserError, match=needle) as caught:
        KeyStore(url.format(tmp=tmp_path))
    assert "hunter2" not in str(caught.value)  # passwords are never echoed


def test_record_usage_validation(store: KeyStore):
    info, _ = store.create("eve")
    _record(store, info.id, "req-1", 1, 2)
    with pytest.raises(UserError, match="request_id: 'req-1' is already recorded"):
        _record(store, info.id, "req-1", 1, 2)
    with pytest.raises(UserError, match="key_missing"):
        _record(store, "key_missing", "req-2", 1, 2)
    with pytest.raises(UserError, match="prompt_tokens: -1"):
        _record(store, info.id, "req-3", -1, 2)
    with pytest.raises(UserError, match="completion_tokens: 1.5"):
        _record(store, info.id, "req-3", 1, 1.5)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="since"):
        store.usage(since=datetime(2025, 1, 1))
    assert store.usage() == [
        UsageSummary(key_id=info.id, name="eve", requests=1, prompt_tokens=1, completion_tokens=2)
    ]


def test_usage_sums_exactly_and_respects_since(store: KeyStore):
    clock = Clock()
    store._clock = clock
    a, _ = store.create("a")
    clock.now += timedelta(seconds=1)  # summaries come in key creation order
    b, _ = store.create("b")
    rng = random.Random(0)
    expected: dict[str, list[tuple[datetime, int, int]]] = {a.id: [], b.id: []}
    for i in range(300):
        clock.now = T0 + timedelta(minutes=i)
        key = a if i % 3 else b
        prompt, completion = rng.randrange(1, 10**6), rng.randrange(0, 10**6)
        _record(store, key.id, f"req-{i}", prompt, completion)
        expected[key.id].append((clock.now, prompt, completion))

    def want(key: KeyInfo, since: datetime | None) -> UsageSummary:
        rows = [r for r in expected[key.id] if since is None or r[0] >= since]
        return UsageSummary(
            key_id=key.id,
            name=key.name,
            requests=len(rows),
            prompt_tokens=sum(r[1] for r in rows),
            completion_tokens=sum(r[2] for r in rows),
        )

    since = T0 + timedelta(minutes=150)  # a record sits exactly on the boundary: included
    assert store.usage() == [want(a, None), want(b, None)]
    assert store.usage(since=since) == [want(a, since), want(b, since)]
    assert store.usage(since=since, key_id=b.id) == [want(b, since)]
    # The same instant in another timezone selects the same rows.
    assert store.usage(since=since.astimezone(timezone(timedelta(hours=-5)))) == store.usage(
        since=since
    )
    assert store.usage(since=T0 + timedelta(days=1)) == []
    table = format_usage(store.usage())
    total = sum(s.total_tokens for s in store.usage())
    assert "TOTAL" in table and str(total) in table and a.id in table
    assert format_usage([]) == "no usage"


def test_concurrent_usage_is_exact(store: KeyStore):
    key, secret = store.create("busy")
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(200):
                assert store.authenticate(secret) is not None
                _record(store, key.id, f"t{t}-r{i}", t + 1, i)
        except BaseException as e:  # surfaced below: an exception in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    (summary,) = store.usage()
    assert summary.requests == 8 * 200
    assert summary.prompt_tokens == sum(t + 1 for t in range(8)) * 200
    assert summary.completion_tokens == 8 * sum(range(200))


def test_in_memory_store_is_shared_between_threads():
    with KeyStore("sqlite://") as store:
        _, secret = store.create("mem")
        found: list[KeyInfo | None] = []
        th = threading.Thread(target=lambda: found.append(store.authenticate(secret)))
        th.start()
        th.join()
        assert found[0] is not None and found[0].name == "mem"


def _key(rpm: int | None = None, tpm: int | None = None) -> KeyInfo:
    return KeyInfo(
        id="key_test",
        name="t",
        prefix="sk-parallm-abcd",
        created_at=T0,
        revoked_at=None,
        rpm=rpm,
        tpm=tpm,
    )


def test_rate_limit_requests_per_minute():
    clock = Seconds()
    limiter = RateLimiter(clock=clock)
    key = _key(rpm=60)
    for _ in range(60):
        assert limiter.check(key, 0) is None
        clock.t += 0.5  # 60 requests over the first 30 s
    retry = limiter.check(key, 0)  # the 61st, at 30 s
    assert retry is not None and retry == pytest.approx(30.0)
    clock.t = 1059.99
    assert limiter.check(key, 0) == pytest.approx(0.01)  # still inside the window
    clock.t = 1060.0
    assert limiter.check(key, 0) is None  # the first request has left the window
    assert limiter.check(key, 0) == pytest.approx(0.5)  # the next slot frees 0.5 s later
    assert limiter.check(_key(), 10**9) is None  # no limits: always admitted


def test_rate_limit_tokens_per_minute_and_commit():
    clock = Seconds()
    limiter = RateLimiter(clock=clock)
    key = _key(tpm=1000)
    assert limiter.check(key, 600) is None
    clock.t += 10
    assert limiter.check(key, 300) is None  # 900 reserved
    retry = limiter.check(key, 200)
    assert retry == pytest.approx(50.0)  # the 600 admitted at 0 s leaves at 60 s
    limiter.commit("key_test", actual_tokens=150, reserved_tokens=600)  # finished short: 450 in use
    assert limiter.check(key, 200) is None  # 650
    assert limiter.check(key, 400) == pytest.approx(50.0)
    clock.t += 50
    assert limiter.check(key, 400) is None  # the 150 left: 500 + 400
    limiter.commit("key_test", actual_tokens=350, reserved_tokens=300)  # overran by 50: 950
    assert limiter.check(key, 100) == pytest.approx(10.0)  # waits for the 350 admitted at 10 s
    with pytest.raises(UserError, match="estimated_tokens: 1001"):
        limiter.check(key, 1001)  # could never fit
    with pytest.raises(UserError, match="estimated_tokens: -1"):
        limiter.check(key, -1)
    limiter.commit("key_unknown", actual_tokens=5, reserved_tokens=5)  # no state: nothing to do


def test_rate_limit_both_limits_wait_for_the_later():
    clock = Seconds()
    limiter = RateLimiter(clock=clock)
    key = _key(rpm=2, tpm=100)
    assert limiter.check(key, 90) is None
    clock.t += 20
    assert limiter.check(key, 5) is None
    clock.t += 20
    assert limiter.check(key, 10) == pytest.approx(20.0)  # rpm and tpm both free at 60 s
    limiter.commit("key_test", actual_tokens=1, reserved_tokens=90)
    assert limiter.check(key, 10) == pytest.approx(20.0)  # rpm still full
    # A request that outlives the window is charged its overrun when it finishes.
    clock.t += 100
    assert limiter.check(key, 10) is None
    clock.t += 70
    limiter.commit("key_test", actual_tokens=60, reserved_tokens=10)
    assert limiter.check(key, 50) is None  # exactly full: 50 overrun + 50
    assert limiter.check(key, 1) == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", T0 - timedelta(hours=24)),
        ("7d", T0 - timedelta(days=7)),
        ("30m", T0 - timedelta(minutes=30)),
        (" 2w ", T0 - timedelta(weeks=2)),
        ("90s", T0 - timedelta(seconds=90)),
        ("2025-02-01", datetime(2025, 2, 1, tzinfo=UTC)),
        ("2025-02-01T06:30:00", datetime(2025, 2, 1, 6, 30, tzinfo=UTC)),
        ("2025-02-01T06:30:00Z", datetime(2025, 2, 1, 6, 30, tzinfo=UTC)),
        ("2025-02-01T06:30:00+02:00", datetime(2025, 2, 1, 4, 30, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime):
    got = parse_since(text, now=T0)
    assert got == expected and got.tzinfo == UTC


@pytest.mark.parametrize("text", ["", "yesterday", "24", "-1d", "3y", "2025-13-01", "99999999999d"])
def test_parse_since_errors(text: str):
    with pytest.raises(UserError, match="--since"):
        parse_since(text, now=T0)


@pytest.fixture(scope="module")
def pg_url():
    with postgres_url() as url:
        if url is None:
            pytest.skip(
                "no PostgreSQL: install Debian's postgresql (.ci/run does) or set "
                "PARALLM_TEST_POSTGRES_URL=postgresql://..."
            )
        yield url


def test_postgresql(pg_url):
    url = pg_url
    with KeyStore(url) as store:
        info, secret = store.create("pg", rpm=5)
        assert store.authenticate(secret) == info
        assert info.created_at.tzinfo == UTC
        for i in range(10):
            _record(store, info.id, f"{info.id}-{i}", i, 2 * i)
        (summary,) = store.usage(key_id=info.id, since=info.created_at)
        assert (summary.requests, summary.prompt_tokens, summary.completion_tokens) == (10, 45, 90)
        assert store.usage(key_id=info.id, since=datetime.now(UTC) + timedelta(hours=1)) == []
        assert store.revoke(info.id).revoked_at is not None
        assert store.authenticate(secret) is None
        with pytest.raises(UserError, match="already recorded"):
            _record(store, info.id, f"{info.id}-0", 1, 1)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_keys_cli_round_trip(kind, tmp_path, capsys, request):
    from parallm.cli import main
    from parallm.serve.keystore import KeyStore

    db = str(tmp_path / "k.db") if kind == "sqlite" else request.getfixturevalue("pg_url")
    assert main(["keys", "create", "--name", "team-a", "--rpm", "60", "--db", db]) == 0
    out = capsys.readouterr().out.splitlines()
    secret, key_id = out[1], out[0].split()[1]
    with KeyStore(db) as store:
        assert store.authenticate(secret).id == key_id
        store.record_usage(
            key_id, request_id="r1", model="m", prompt_tokens=7, completion_tokens=5, endpoint="x"
        )
    assert main(["keys", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and secret not in listing
    assert main(["keys", "usage", "--since", "1d", "--db", db]) == 0
    assert "12" in capsys.readouterr().out
    assert main(["keys", "revoke", key_id, "--db", db]) == 0
    assert main(["keys", "revoke", "key_nope", "--db", db]) == 2
    assert "key_nope" in capsys.readouterr().err
