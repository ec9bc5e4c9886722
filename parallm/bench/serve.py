"""`parallm bench serve`: latency and throughput of a running server under Poisson load.

For each request rate, N requests of random prompt token ids (prompt and output lengths drawn
uniformly from the given ranges) are sent to `POST /v1/completions` as streams, arriving as a
Poisson process (exponential gaps; `inf` sends them all at once), at most `--max-concurrency`
in flight. Every request generates exactly its output length (`ignore_eos`). Each rate draws its
own prompts (from the seed and the rate's index), so no rate finds another's in the prefix cache.

Per rate: time to the first chunk with text (TTFT), time per output token after the first
(TPOT, from the token count in the usage chunk), the gaps between successive chunks with text
(ITL), end-to-end latency (E2E) — mean, median and p99 in ms — and
request, output-token and total-token throughput; printed, saved as JSON, and plotted (latency
against output throughput, one point per rate) as PNG. A server sends no chunk while it holds
back the text of an incomplete character, so then one chunk carries several tokens: TTFT and ITL
are times the client could see text, as in the serving benchmarks of this field.

    parallm bench serve --url http://127.0.0.1:8000 --rates 1,4,16,inf --num-requests 200

`--launch DIR` starts the servers itself instead of `--url`: `parallm serve --model DIR` on a free
loopback port, then, with `--peer-python PATH` (a Python with vLLM, e.g. `.venv-peers/bin/python`
from `make bench-peers`), vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`) on
the same model, dtype, batching limits and KV bytes, one after the other, each stopped before the
next starts; the same rates and prompts go to both. `--rounds N` does that N times, the order
alternating, each server started afresh: a neighbour's burst then lands on one round, not on
one server's every figure. The report gives each server's figures per round and, per rate, the
TTFT and TPOT medians side by side (`comparison`: medians over rounds, the median of the
rounds' ratios, and each round's ratio).

    parallm bench serve --launch MODEL_DIR --peer-python .venv-peers/bin/python --rates 4,16,inf
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parallm.bench import parse_len_range
from parallm.errors import UserError
from parallm.serve.sse_client import error_message, parse_sse
from parallm.utils.fs import save_figure_atomic, write_json_atomic

if TYPE_CHECKING:  # imported where used: `parallm bench serve --help` answers at once
    import httpx
    import numpy as np

LATENCIES = ("ttft", "tpot", "itl", "e2e")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        raise UserError(f"bench serve: {message}")


@dataclass(frozen=True, kw_only=True)
class ServeBenchConfig:
    """What to send where; every field is checked here, a bad one is a UserError naming it."""

    url: str | None  # None: --launch starts the servers
    model: str | None = None  # None: the first model the server lists
    launch: Path | None = None  # a model directory: start `parallm serve` (and the peer) on it
    peer_python: str | None = None  # with launch: also vLLM's server in this Python
    dtype: str = "float32"  # launched servers
    max_num_batched_tokens: int = 2048  # launched servers
    threads: int = 0  # launched servers' OMP_NUM_THREADS (0: their default)
    startup_timeout: float = 900.0  # seconds for a launched server to answer
    rounds: int = 1  # launched servers: each started afresh this many times, order alternating
    api_key: str | None = None
    rates: tuple[float, ...] = (math.inf,)  # requests/s; inf: all at once
    num_requests: int = 100  # per rate
    max_concurrency: int | None = None  # requests in flight; None: no cap
    input_len: tuple[int, int] = (32, 256)
    output_len: tuple[int, int] = (32, 256)
    vocab_size: int = 256  # prompt ids are drawn from [0, vocab_size)
    seed: int = 0
    timeout: float = 600.0  # seconds per request
    output: Path = Path("bench_serve.json")
    plot: Path = Path("bench_serve.png")

    def __post_init__(self) -> None:
        if (self.url is None) == (self.launch is None):
            raise UserError("bench serve: give --url (a running server) or --launch MODEL_DIR")
        if self.rounds != 1 and self.launch is None:
            raise UserError(
                f"--rounds: {self.rounds} needs --launch MODEL_DIR (it restarts the servers)"
            )
        if self.peer_python is not None and self.launch is None:
            raise UserError(
                "--peer-python: starts the peer's server, so it needs --launch MODEL_DIR"
            )
        if self.launch is not None and not (self.launch / "config.json").is_file():
            raise UserError(
                f"--launch: {str(self.launch)!r} is not a model directory (no config.json)"
            )
        url = self.url or "http://"
        if not url.startswith(("http://", "https://")) or url.rstrip("/").endswith("/v1"):
            raise UserError(
                f"--url: {self.url!r} is not valid; give the server's base URL, "
                "e.g. http://127.0.0.1:8000"
            )
        if not self.rates or any(not r > 0 for r in self.rates):
            raise UserError(f"--rates: {self.rates} is not valid; every rate must be > 0 or inf")
        for name, value in (
            ("--num-requests", self.num_requests),
            ("--vocab-size", self.vocab_size),
            ("--rounds", self.rounds),
        ):
            if value < 1:
                raise UserError(f"{name}: {value} is not valid; must be >= 1")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise UserError(f"--max-concurrency: {self.max_concurrency} is not valid; must be >= 1")
        for name, (lo, hi) in (
            ("--input-len", self.input_len),
            ("--output-len", self.output_len),
        ):
            if not 1 <= lo <= hi:
                raise UserError(f"{name}: {lo}:{hi} is not valid; need 1 <= LOW <= HIGH")
        if not self.timeout > 0:
            raise UserError(f"--timeout: {self.timeout} is not valid; must be > 0 seconds")
        if self.plot == self.output:
            raise UserError(f"--plot: {str(self.plot)!r} is the --output path; give another")
        for name, path in (("--output", self.output), ("--plot", self.plot)):
            if path.is_dir():  # found now, not after the whole run
                raise UserError(f"{name}: {str(path)!r} is a directory; give a file path")


# -- workload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


def workload(
    n: int, vocab: int, inp: tuple[int, int], outp: tuple[int, int], rng: np.random.Generator
) -> list[Request]:
    """`n` requests: prompt and output lengths uniform in the inclusive ranges, ids in [0, vocab)."""
    requests = []
    for _ in range(n):
        length = int(rng.integers(inp[0], inp[1] + 1))
        prompt = rng.integers(0, vocab, length).tolist()
        requests.append(Request(prompt, int(rng.integers(outp[0], outp[1] + 1))))
    return requests


def arrival_times(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Send times (s from the start) of `n` Poisson arrivals at `rate` per second: the first at
    0, then exponential gaps of mean 1/rate; all at 0 for an infinite rate."""
    import numpy as np

    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.exponential(1.0 / rate, n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


# -- one request ------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """One request as the client saw it: times in seconds from its send."""

    prompt_len: int
    output_len: int  # requested
    output_tokens: int = 0  # generated, from the stream's usage
    prompt_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None
    sent_at: float | None = None  # s from the first send of its rate

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def result_from_events(req: Request, events: list[tuple[float, dict | str]]) -> RequestResult:
    """A request's result from its stream's payloads, each with its arrival time (s from send).

    A chunk whose choices carry text marks a token arrival; the usage chunk gives the counts;
    the stream must end with [DONE]. An error payload fails the request with its message."""
    import numpy as np

    r = RequestResult(prompt_len=len(req.prompt), output_len=req.output_len)
    token_times: list[float] = []
    usage = None
    for t, payload in events:
        if payload == "[DONE]":
            r.e2e = t
            break
        if "error" in payload:
            r.error = str(payload["error"].get("message", payload["error"]))
            return r
        if any(c.get("text") for c in payload.get("choices", [])):
            token_times.append(t)
        usage = payload.get("usage") or usage
    if r.e2e is None:
        r.error = "the stream ended before [DONE]"
    elif usage is None:
        r.error = "the stream has no usage chunk"
    elif not token_times:
        r.error = "the stream has no text"
    if r.error is not None:
        return r
    r.output_tokens, r.prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    r.ttft = token_times[0]
    r.itl = np.diff(token_times).tolist()
    return r


def _error_message(status: int, body: bytes) -> str:
    return f"HTTP {status}: {error_message(body, limit=200)}"


async def send_request(
    client: httpx.AsyncClient, model: str, req: Request, timeout: float | None = None
) -> RequestResult:
    """Stream one completion, for at most `timeout` seconds in all; a failure of any kind is
    recorded in the result, never raised."""
    import httpx

    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events: list[tuple[float, dict | str]] = []
    start = time.perf_counter()
    try:
        async with (
            asyncio.timeout(timeout),
            client.stream("POST", "/v1/completions", json=body) as resp,
        ):
            if resp.status_code != 200:
                message = _error_message(resp.status_code, await resp.aread())
                return RequestResult(len(req.prompt), req.output_len, error=message)
            async for line in resp.aiter_lines():
                payload = parse_sse(line)
                if payload is not None:
                    events.append((time.perf_counter() - start, payload))
        return result_from_events(req, events)
    except TimeoutError:
        error = f"not finished within --timeout {timeout} s"
        return RequestResult(len(req.prompt), req.output_len, error=error)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as e:
        # A refused connection or a stream that is not the API's: a failed request.
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return RequestResult(len(req.prompt), req.output_len, error=error)


# -- statistics -------------------------------------------------------------------------------


def summary_ms(values_s: list[float]) -> dict[str, float | None]:
    """Mean, median and p99 in milliseconds of values in seconds (None each when empty)."""
    import numpy as np

    if not values_s:
        return {"mean": None, "median": None, "p99": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "mean": float(ms.mean()),
        "median": float(np.median(ms)),
        "p99": float(np.percentile(ms, 99)),
    }


def rate_report(rate: float, results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Counts, throughput and latency summaries of one rate's results. ITL pools the gaps of
    every completed request; failed requests count in nothing but `failed` and `errors`."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    return {
        "rate": "inf" if math.isinf(rate) else rate,
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "ttft_ms": summary_ms([r.ttft for r in done]),
        "tpot_ms": summary_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": summary_ms([gap for r in done for gap in r.itl]),
        "e2e_ms": summary_ms([r.e2e for r in done]),
        "errors": sorted({r.error for r in results if r.error is not None}),
        "requests": [_request_record(r) for r in results],
    }


def _request_record(r: RequestResult) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000.0

    return {
        "prompt_len": r.prompt_len,
        "output_len": r.output_len,
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "ttft_ms": ms(r.ttft),
        "tpot_ms": ms(r.tpot),
        "e2e_ms": ms(r.e2e),
        "sent_at_s": r.sent_at,
        "error": r.error,
    }


# -- running ----------------------------------------------------------------------------------


async def run_rate(
    client: httpx.AsyncClient,
    cfg: ServeBenchConfig,
    model: str,
    requests: list[Request],
    times: np.ndarray,
) -> tuple[list[RequestResult], float]:
    """Send `requests` at `times` (s from now), at most `cfg.max_concurrency` in flight; returns
    their results and the seconds from the first send to the last finish."""
    cap = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    async def one(req: Request) -> RequestResult:
        async with cap or contextlib.nullcontext():
            sent_at = time.perf_counter() - start
            result = await send_request(client, model, req, cfg.timeout)
        result.sent_at = sent_at
        return result

    start = time.perf_counter()
    tasks = []
    for req, at in zip(requests, times, strict=True):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


async def run_all(cfg: ServeBenchConfig) -> tuple[str, list[dict[str, Any]]]:
    """Check the server with one request, then run every rate; returns (model, reports)."""
    import httpx
    import numpy as np

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    # One connection per request in flight: a smaller pool would be a hidden concurrency cap.
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=None)
    timeout = httpx.Timeout(None, connect=10.0)  # send_request bounds each request as a whole
    async with httpx.AsyncClient(
        base_url=cfg.url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        model = cfg.model or await first_model(client, cfg.url)
        probe = await send_request(client, model, Request([1, 2, 3], 2), cfg.timeout)
        if not probe.ok:
            raise UserError(f"--url: {cfg.url} failed a test request: {probe.error}")
        reports = []
        for i, rate in enumerate(cfg.rates):
            # Fresh prompts per rate, so that no rate reuses another's cached prefixes.
            rng = np.random.default_rng([cfg.seed, i])
            requests = workload(
                cfg.num_requests, cfg.vocab_size, cfg.input_len, cfg.output_len, rng
            )
            times = arrival_times(rate, cfg.num_requests, rng)
            print(f"rate {_rate(rate)} req/s: {cfg.num_requests} requests ...", flush=True)
            results, duration = await run_rate(client, cfg, model, requests, times)
            reports.append(rate_report(rate, results, duration))
    return model, reports


async def first_model(client: httpx.AsyncClient, url: str) -> str:
    import httpx

    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as e:
        raise UserError(f"--url: {url} cannot be reached ({type(e).__name__}: {e})") from None
    if resp.status_code != 200:
        raise UserError(f"--url: GET /v1/models {_error_message(resp.status_code, resp.content)}")
    data = resp.json().get("data") or []
    if not data:
        raise UserError(f"--url: {url} lists no models; give --model")
    return data[0]["id"]


# -- launched servers: parallm's, then the peer's -----------------------------------------------

SERVERS = ("parallm", "vllm")
KV_CACHE_BYTES = 1 << 30  # parallm's CPU default (at most 1 GiB), given to vLLM too


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(engine: str, cfg: ServeBenchConfig, port: int) -> list[str]:
    """The command that serves `cfg.launch` on 127.0.0.1:`port` under the name "bench"."""
    common = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        cfg.dtype,
        "--max-num-batched-tokens",
        str(cfg.max_num_batched_tokens),
        "--served-model-name",
        "bench",
    ]
    if engine == "parallm":
        return [
            sys.executable,
            "-m",
            "parallm.cli",
            "serve",
            "--model",
            str(cfg.launch),
            "--no-auth",
            "--kv-cache-memory",
            str(KV_CACHE_BYTES),
            *common,
        ]
    # On vLLM's CPU backend --gpu-memory-utilization is the share of host memory it checks is
    # free; the KV cache is sized by --kv-cache-memory-bytes.
    return [
        cfg.peer_python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(cfg.launch),
        "--kv-cache-memory-bytes",
        str(KV_CACHE_BYTES),
        "--gpu-memory-utilization",
        "0.2",
        "--max-num-seqs",
        "256",
        *common,
    ]


async def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll GET /v1/models until it answers 200; a UserError if the server exits or is not up
    within `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise UserError(
                    f"--launch: the server exited with status {proc.returncode}; see {log}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/v1/models")).status_code == 200:
                    return
            await asyncio.sleep(1.0)
    raise UserError(f"--launch: the server did not answer within {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (both servers drain and exit), then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_launched(cfg: ServeBenchConfig) -> dict[str, list[list[dict[str, Any]]]]:
    """`cfg.rounds` rounds; in each, each server in turn (the order alternating from round to
    round): start it, run every rate against it, stop it. Per server, per round, the reports."""
    import dataclasses

    from parallm.bench.infer import check_peer_python

    if cfg.peer_python:  # one line saying how to make it, before any server starts
        check_peer_python("vllm", cfg.peer_python)
    servers = SERVERS if cfg.peer_python else SERVERS[:1]
    out: dict[str, list[list[dict[str, Any]]]] = {engine: [] for engine in servers}
    env = dict(os.environ)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # as many threads as parallm, unpinned
    for round_ in range(cfg.rounds):
        for engine in servers if round_ % 2 == 0 else servers[::-1]:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            log = cfg.output.parent / f"{cfg.output.stem}.{engine}.log"
            print(
                f"round {round_ + 1}/{cfg.rounds} {engine}: starting on {url} (log {log})",
                flush=True,
            )
            with log.open("w" if round_ == 0 else "a") as f:
                proc = subprocess.Popen(
                    server_command(engine, cfg, port), stdout=f, stderr=subprocess.STDOUT, env=env
                )
            try:
                asyncio.run(wait_ready(url, proc, cfg.startup_timeout, log))
                run_cfg = dataclasses.replace(
                    cfg, url=url, launch=None, peer_python=None, model="bench", rounds=1
                )
                out[engine].append(asyncio.run(run_all(run_cfg))[1])
            finally:
                stop(proc)
    return out


def comparison(engines: dict[str, list[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per rate: each server's TTFT and TPOT medians (ms; the median over rounds of each
    round's median) and parallm's over the peer's: the median of the rounds' ratios, and each
    round's."""
    import statistics

    rows = []
    for i, r in enumerate(engines["parallm"][0]):
        row: dict[str, Any] = {"rate": r["rate"]}
        for name in ("ttft", "tpot"):
            per_round = {
                engine: [rs[i][f"{name}_ms"]["median"] for rs in rounds]
                for engine, rounds in engines.items()
            }
            for engine, values in per_round.items():
                known = [v for v in values if v is not None]
                row[f"{engine}_{name}_ms"] = statistics.median(known) if known else None
            ratios = [
                ours / theirs if ours and theirs else None
                for ours, theirs in zip(
                    per_round["parallm"], per_round.get("vllm", []), strict=False
                )
            ]
            known = [x for x in ratios if x is not None]
            row[f"{name}_parallm_over_vllm"] = statistics.median(known) if known else None
            row[f"{name}_parallm_over_vllm_rounds"] = ratios
        rows.append(row)
    return rows


def _ratio(x: float | None) -> str:
    return f"{'-':>6}" if x is None else f"{x:6.2f}"


def format_comparison(rows: list[dict[str, Any]]) -> str:
    lines = [
        "median ms over rounds, parallm against vllm (ratio: the median of the rounds' ratios;"
        " < 1: parallm is faster)",
        f"{'rate':>6} {'TTFT parallm':>13} {'TTFT vllm':>10} {'ratio':>6} {'TPOT parallm':>13} {'TPOT vllm':>10} {'ratio':>6}",
    ]
    for r in rows:
        lines.append(
            f"{_rate(r['rate']):>6} {_fmt(r['parallm_ttft_ms'], 13)} {_fmt(r.get('vllm_ttft_ms'), 10)} "
            f"{_ratio(r['ttft_parallm_over_vllm'])} {_fmt(r['parallm_tpot_ms'], 13)} "
            f"{_fmt(r.get('vllm_tpot_ms'), 10)} {_ratio(r['tpot_parallm_over_vllm'])}"
        )
    return "\n".join(lines)


# -- output -----------------------------------------------------------------------------------


def _rate(rate: float | str) -> str:
    return f"{rate:g}" if isinstance(rate, float | int) else rate


def _fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.1f}"


def format_table(reports: list[dict[str, Any]]) -> str:
    """A throughput table and a latency table, one row per rate."""
    lines = [
        f"{'rate':>6} {'done':>5} {'failed':>6} {'time_s':>8} {'req/s':>7} "
        f"{'out_tok/s':>10} {'tot_tok/s':>10}"
    ]
    for r in reports:
        lines.append(
            f"{_rate(r['rate']):>6} {r['completed']:>5} {r['failed']:>6} {r['duration_s']:8.2f} "
            f"{r['request_throughput']:7.2f} {r['output_throughput']:10.1f} "
            f"{r['total_token_throughput']:10.1f}"
        )
    stats = ("mean", "median", "p99")
    lines += [
        "",
        "latency (ms)",
        f"{'rate':>6}" + "".join(f" | {n.upper():<26}" for n in LATENCIES),
    ]
    lines.append(f"{'':>6}" + " | {:>8} {:>8} {:>8}".format(*stats) * len(LATENCIES))
    for r in reports:
        cells = "".join(
            " | " + " ".join(_fmt(r[f"{n}_ms"][s], 8) for s in stats) for n in LATENCIES
        )
        lines.append(f"{_rate(r['rate']):>6}{cells}")
    return "\n".join(line.rstrip() for line in lines)


def save_plot(reports: list[dict[str, Any]], path: Path) -> None:
    """Median and p99 TPOT and E2E against output throughput, one point per rate; written
    through a temporary name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, name in zip(axes, ("tpot", "e2e"), strict=True):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            points = [
                (r["output_throughput"], r[f"{name}_ms"][stat], r["rate"])
                for r in reports
                if r[f"{name}_ms"][stat] is not None
            ]
            if not points:
                continue
            xs, ys, _ = zip(*points, strict=True)
            ax.plot(xs, ys, style, label=stat)
            for x, y, rate in points:
                ax.annotate(f"{_rate(rate)}/s", (x, y), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("output throughput (tokens/s)")
        ax.set_ylabel(f"{name.upper()} (ms)")
        ax.set_title(f"{name.upper()} against throughput")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    save_figure_atomic(fig, path)


# -- command line -----------------------------------------------------------------------------


def parse_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(","))
    except ValueError:
        rates = ()
    if not rates or any(not r > 0 for r in rates):  # not > 0: NaN too
        raise UserError(
            f"--rates: {text!r} is not valid; give requests/s > 0 separated by commas, "
            "or inf (all at once), e.g. 1,4,inf"
        )
    return rates


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="parallm bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--launch",
        default=None,
        metavar="MODEL_DIR",
        help="start parallm serve on it (instead of --url)",
    )
    p.add_argument(
        "--peer-python",
        default=None,
        metavar="PATH",
        help="with --launch: also vLLM's server, in this Python",
    )
    p.add_argument("--dtype", default="float32", help="--launch: the servers' dtype")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="--launch: tokens per step"
    )
    p.add_argument("--threads", type=int, default=0, help="--launch: the servers' OMP_NUM_THREADS")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--launch: start and measure each server this many times, order alternating",
    )
    p.add_argument("--model", default=None, help="served model name (default: the first listed)")
    p.add_argument("--api-key", default=None, help="default: $PARALLM_API_KEY")
    p.add_argument("--rates", default="inf", metavar="R,R,...", help="requests/s; inf: all at once")
    p.add_argument("--num-requests", type=int, default=100, metavar="N", help="per rate")
    p.add_argument("--max-concurrency", type=int, default=None, metavar="N", help="in flight")
    p.add_argument("--input-len", default="32:256", help="N or LOW:HIGH prompt tokens")
    p.add_argument("--output-len", default="32:256", help="N or LOW:HIGH output tokens")
    p.add_argument("--vocab-size", type=int, default=256, help="prompt ids from [0, this)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request, in all")
    p.add_argument("--output", default="bench_serve.json", help="JSON report path")
    p.add_argument("--plot", default=None, help="PNG path (default: --output with .png)")
    return p


def parse_config(argv: list[str]) -> ServeBenchConfig:
    args = parser().parse_args(argv)
    output = Path(args.output)
    return ServeBenchConfig(
        url=args.url.rstrip("/") if args.url else None,
        launch=Path(args.launch) if args.launch else None,
        peer_python=args.peer_python,
        dtype=args.dtype,
        max_num_batched_tokens=args.max_num_batched_tokens,
        threads=args.threads,
        rounds=args.rounds,
        model=args.model,
        api_key=args.api_key or os.environ.get("PARALLM_API_KEY") or None,
        rates=parse_rates(args.rates),
        num_requests=args.num_requests,
        max_concurrency=args.max_concurrency,
        input_len=parse_len_range(args.input_len, "--input-len"),
        output_len=parse_len_range(args.output_len, "--output-len"),
        vocab_size=args.vocab_size,
        seed=args.seed,
        timeout=args.timeout,
        output=output,
        plot=Path(args.plot) if args.plot else output.with_suffix(".png"),
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    for path in (cfg.output, cfg.plot):
        path.parent.mkdir(parents=True, exist_ok=True)
    if cfg.launch is not None:
        engines = run_launched(cfg)
        model, reports = "bench", engines["parallm"][0]
    else:
        model, reports = asyncio.run(run_all(cfg))
        engines = {}
    if not engines:
        print(format_table(reports), flush=True)
    for engine, rounds in engines.items():
        for i, rs in enumerate(rounds):
            label = f"{engine} (round {i + 1}):" if len(rounds) > 1 else f"{engine}:"
            print(label, format_table(rs), sep="\n", flush=True)
    config = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
    config |= {
        "model": model,
        "rates": ["inf" if math.isinf(r) else r for r in cfg.rates],
        "output": str(cfg.output),
        "plot": str(cfg.plot),
        "launch": str(cfg.launch) if cfg.launch else None,
    }
    report: dict[str, Any] = {"config": config, "results": reports}
    if engines:
        report["engines"] = engines  # per server, per round, per rate
    if len(engines) > 1:
        report["comparison"] = comparison(engines)
        print(format_comparison(report["comparison"]), flush=True)
    write_json_atomic(cfg.output, report)
    save_plot(reports, cfg.plot)
    print(f"saved {cfg.output} and {cfg.plot}", flush=True)
    every = [r for rounds in engines.values() for rs in rounds for r in rs] or reports
    failed = sum(r["failed"] for r in every)
    if failed:
        first = next(e for r in every for e in r["errors"])
        print(
            f"{failed} requests failed (all errors in {cfg.output}); one: {first}", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
