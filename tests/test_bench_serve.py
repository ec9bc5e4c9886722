"""`parallm bench serve`: its statistics against numpy, Poisson arrivals, option errors, and a run
against a live `parallm serve`."""

from __future__ import annotations

import asyncio
import itertools
import json
import math

import httpx
import numpy as np
import pytest

from parallm import cli
from parallm.bench import serve as bench
from parallm.errors import UserError
from parallm.serve.keystore import KeyStore
from tests.serve_helpers import free_port, running_server, save_chat_model

# -- statistics -------------------------------------------------------------------------------


def test_summary_ms_against_numpy_and_by_hand():
    values = [0.010, 0.020, 0.030, 0.100]  # s
    got = bench.summary_ms(values)
    # p99 by hand, linear interpolation: position 0.99 * 3 = 2.97, 30 + 0.97 * (100 - 30)
    assert got == pytest.approx({"mean": 40.0, "median": 25.0, "p99": 97.9})
    rng = np.random.default_rng(3)
    values = rng.exponential(0.05, 1001).tolist()
    ms = np.asarray(values) * 1000
    assert bench.summary_ms(values) == pytest.approx(
        {"mean": ms.mean(), "median": np.median(ms), "p99": np.percentile(ms, 99)}
    )
    assert bench.summary_ms([]) == {"mean": None, "median": None, "p99": None}


def chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


def test_result_from_events_times_tokens_and_gaps():
    req = bench.Request([7, 8, 9], 5)
    events = [
        (0.100, chunk("a")),
        (0.150, chunk("bc")),  # two tokens in one chunk: one arrival
        (0.150, chunk("")),  # text held back: no arrival
        (0.400, chunk("d", "length")),
        (0.410, USAGE),
        (0.420, "[DONE]"),
    ]
    r = bench.result_from_events(req, events)
    assert r.ok and (r.prompt_len, r.output_len) == (3, 5)
    assert (r.prompt_tokens, r.output_tokens) == (3, 5)
    assert r.ttft == pytest.approx(0.100)
    assert r.itl == pytest.approx([0.050, 0.250])
    assert r.e2e == pytest.approx(0.420)
    assert r.tpot == pytest.approx((0.420 - 0.100) / 4)  # 4 tokens after the first


def test_result_from_events_failures():
    req = bench.Request([1], 2)
    error = {"error": {"message": "engine failed: boom", "type": "server_error"}}
    cases = {
        "engine failed: boom": [(0.1, chunk("a")), (0.2, error)],
        "the stream ended before [DONE]": [(0.1, chunk("a")), (0.2, USAGE)],
        "the stream has no usage chunk": [(0.1, chunk("a")), (0.2, "[DONE]")],
        "the stream has no text": [(0.1, chunk("")), (0.2, USAGE), (0.3, "[DONE]")],
    }
    for message, events in cases.items():
        r = bench.result_from_events(req, events)
        assert not r.ok and r.error == message
        assert r.tpot is None


def test_parse_sse():
    assert bench.parse_sse('data: {"a": 1}') == {"a": 1}
    assert bench.parse_sse("data: [DONE]") == "[DONE]"
    assert bench.parse_sse("") is None
    assert bench.parse_sse(": keep-alive") is None


def ok(
    ttft: float, e2e: float, out: int, itl: list[float], prompt: int = 10
) -> bench.RequestResult:
    return bench.RequestResult(
        prompt_len=prompt, output_len=out, prompt_tokens=prompt, output_tokens=out,
        ttft=ttft, e2e=e2e, itl=itl,
    )  # fmt: skip


def test_rate_report_counts_throughput_and_latencies():
    results = [
        ok(0.1, 1.0, 10, [0.1] * 9),
        ok(0.3, 2.1, 7, [0.2, 0.4, 0.3]),
        ok(0.2, 0.2, 1, []),  # one token: no TPOT
        bench.RequestResult(prompt_len=5, output_len=4, error="HTTP 429: busy"),
    ]
    rep = bench.rate_report(2.0, results, duration=4.0)
    assert (rep["completed"], rep["failed"], rep["errors"]) == (3, 1, ["HTTP 429: busy"])
    assert rep["rate"] == 2.0
    assert rep["total_output_tokens"] == 18 and rep["total_input_tokens"] == 30
    assert rep["request_throughput"] == pytest.approx(3 / 4.0)
    assert rep["output_throughput"] == pytest.approx(18 / 4.0)
    assert rep["total_token_throughput"] == pytest.approx(48 / 4.0)

    def stats(values_s):
        ms = np.asarray(values_s) * 1000
        return pytest.approx(
            {"mean": ms.mean(), "median": np.median(ms), "p99": np.percentile(ms, 99)}
        )

    assert rep["ttft_ms"] == stats([0.1, 0.3, 0.2])
    assert rep["e2e_ms"] == stats([1.0, 2.1, 0.2])
    assert rep["tpot_ms"] == stats([0.9 / 9, 1.8 / 6])
    assert rep["itl_ms"] == stats([0.1] * 9 + [0.2, 0.4, 0.3])  # pooled over requests
    assert [q["error"] for q in rep["requests"]] == [None, None, None, "HTTP 429: busy"]
    assert rep["requests"][1]["tpot_ms"] == pytest.approx(300.0)
    assert bench.rate_report(math.inf, results[3:], 1.0)["rate"] == "inf"
    json.dumps(rep, allow_nan=False)  # plain JSON: no NaN, no Infinity


def test_table_shows_every_rate_and_dashes_for_nothing():
    reports = [
        bench.rate_report(1.5, [ok(0.1, 1.0, 10, [0.1] * 9)], 2.0),
        bench.rate_report(math.inf, [bench.RequestResult(1, 1, error="x")], 1.0),
    ]
    lines = bench.format_table(reports).splitlines()
    assert lines[1].split()[:3] == ["1.5", "1", "0"] and lines[2].split()[:3] == ["inf", "0", "1"]
    assert lines[-2].split("|")[1].split() == ["100.0"] * 3  # TTFT of one request, in ms
    assert lines[-1].split("|")[1].split() == ["-", "-", "-"]


# -- workload and arrivals --------------------------------------------------------------------


def test_poisson_arrivals_mean_spread_and_seed():
    rate, n = 5.0, 20000
    times = bench.arrival_times(rate, n, np.random.default_rng(1))
    gaps = np.diff(times)
    assert times[0] == 0.0 and len(times) == n and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)  # exponential: std equals the mean
    again = bench.arrival_times(rate, n, np.random.default_rng(1))
    np.testing.assert_array_equal(times, again)
    other = bench.arrival_times(rate, n, np.random.default_rng(2))
    assert not np.array_equal(times, other)
    np.testing.assert_array_equal(bench.arrival_times(math.inf, 4, np.random.default_rng(1)), 0)


def test_workload_lengths_ids_and_seed():
    reqs = bench.workload(500, 37, (4, 9), (2, 3), np.random.default_rng(0))
    assert {len(r.prompt) for r in reqs} == set(range(4, 10))  # both ends reached
    assert {r.output_len for r in reqs} == {2, 3}
    assert {i for r in reqs for i in r.prompt} == set(range(37))
    assert reqs == bench.workload(500, 37, (4, 9), (2, 3), np.random.default_rng(0))


# -- options ----------------------------------------------------------------------------------

URL = ["--url", "http://127.0.0.1:8000"]


@pytest.mark.parametrize(
    "argv, option",
    [
        (["--rates", "0"], "--rates"),
        (["--rates=-1,2"], "--rates"),
        (["--rates", "fast"], "--rates"),
        (["--rates", "1,,2"], "--rates"),
        (["--rates", "nan"], "--rates"),
        (["--input-len", "16:4"], "--input-len"),
        (["--input-len", "0:4"], "--input-len"),
        (["--output-len", "8,9"], "--output-len"),
        (["--output-len", "9:3"], "--output-len"),
        (["--num-requests", "0"], "--num-requests"),
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--vocab-size", "0"], "--vocab-size"),
        (["--timeout", "0"], "--timeout"),
        (["--output", "x.png"], "--plot"),  # the plot's default path is the output's
        (["--output", "tests"], "--output"),  # a directory: refused before any request
        (["--plot", "tests"], "--plot"),
        (["--rounds", "2"], "--rounds"),  # restarting servers needs --launch
    ],
)
def test_bad_options_are_user_errors_naming_the_option(argv, option):
    with pytest.raises(UserError) as e:
        bench.parse_config(URL + argv)
    assert str(e.value).startswith(f"{option}: ")
    assert argv[-1].split("=")[-1] in str(e.value)  # names the value


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "http://127.0.0.1:8000/v1"])
def test_bad_url(url):
    with pytest.raises(UserError, match="^--url: "):
        bench.parse_config(["--url", url])


def test_defaults_and_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("PARALLM_API_KEY", "sk-env")
    cfg = bench.parse_config(URL + ["--rates", "1,2.5,inf", "--output", "out/r.json"])
    assert cfg.rates == (1.0, 2.5, math.inf)
    assert cfg.api_key == "sk-env"
    assert (str(cfg.output), str(cfg.plot)) == ("out/r.json", "out/r.png")
    cfg = bench.parse_config(URL + ["--api-key", "sk-flag", "--input-len", "3"])
    assert cfg.api_key == "sk-flag" and cfg.input_len == (3, 3)


def test_cli_prints_one_line_and_exits_2(capsys):
    assert cli.main(["bench", "serve", "--url", "http://x:1", "--rates", "0"]) == 2
    assert cli.main(["bench", "serve", "--rates", "1"]) == 2  # --url missing
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("parallm: error: --rates: '0' is not valid")
    assert "--url" in err[1]


def test_unreachable_server_is_one_line_and_failed_requests_are_counted():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(UserError, match="^--url: .* cannot be reached"):
        bench.main(["--url", url])

    async def send() -> bench.RequestResult:
        async with httpx.AsyncClient(base_url=url) as client:
            return await bench.send_request(client, "m", bench.Request([1, 2], 3))

    r = asyncio.run(send())
    assert not r.ok and r.error.startswith("ConnectError")


def test_request_body_and_refusals_through_a_mock_transport():
    """What one request sends, and that a refusal is a failed result with the server's message."""
    seen = []
    sse = "".join(f"data: {json.dumps(p)}\n\n" for p in (chunk("a"), chunk("b"), USAGE))
    answers = iter([
        httpx.Response(200, text=sse + "data: [DONE]\n\n"),
        httpx.Response(429, json={"error": {"message": "too many requests waiting"}}),
        httpx.Response(502, text="bad gateway"),
    ])  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("authorization"), request.content))
        return next(answers)

    async def send_three() -> list[bench.RequestResult]:
        transport = httpx.MockTransport(handler)
        headers = {"Authorization": "Bearer sk-1"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://s", headers=headers
        ) as c:
            return [await bench.send_request(c, "m", bench.Request([5, 6, 7], 5)) for _ in range(3)]

    good, busy, bad = asyncio.run(send_three())
    path, auth, body = seen[0]
    assert (path, auth) == ("/v1/completions", "Bearer sk-1")
    assert json.loads(body) == {
        "model": "m",
        "prompt": [5, 6, 7],
        "max_tokens": 5,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert good.ok and good.output_tokens == 5 and len(good.itl) == 1
    assert busy.error == "HTTP 429: too many requests waiting"
    assert bad.error == "HTTP 502: bad gateway"


# -- against a live server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_serve") / "model"
    save_chat_model(d)  # vocabulary of 280
    with running_server(d, "--no-auth") as url:
        yield url


def run_bench(url: str, out, *more: str) -> dict:
    argv = ["--url", url, "--num-requests", "8", "--input-len", "4:16"]
    argv += ["--output-len", "4:12", "--vocab-size", "200", "--output", str(out), *more]
    assert bench.main(argv) == 0
    return json.loads(out.read_text())


def test_live_server_two_rates(server, tmp_path):
    out = tmp_path / "reports" / "bench.json"  # a directory that does not exist yet
    report = run_bench(server, out, "--rates", "20,inf", "--seed", "3")
    assert report["config"]["rates"] == [20.0, "inf"] and "api_key" not in report["config"]
    assert [r["rate"] for r in report["results"]] == [20.0, "inf"]
    for r in report["results"]:
        reqs = r["requests"]
        assert (r["completed"], r["failed"], r["errors"]) == (8, 0, [])
        assert all(4 <= q["prompt_len"] <= 16 and 4 <= q["output_len"] <= 12 for q in reqs)
        # ignore_eos: every request generates exactly the drawn length, per the server's usage
        assert [q["output_tokens"] for q in reqs] == [q["output_len"] for q in reqs]
        assert r["total_output_tokens"] == sum(q["output_len"] for q in reqs)
        assert r["total_input_tokens"] == sum(q["prompt_len"] for q in reqs)
        assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration_s"])
        for name in bench.LATENCIES:
            s = r[f"{name}_ms"]
            assert s["p99"] >= s["median"] >= 0 and s["mean"] > 0, (name, s)
        assert all(0 < q["ttft_ms"] <= q["e2e_ms"] for q in reqs)
        assert r["e2e_ms"]["median"] >= r["ttft_ms"]["median"]
    # inf: all eight are sent at once; 20/s: spread over about 8 / 20 s
    sent_inf = [q["sent_at_s"] for q in report["results"][1]["requests"]]
    assert max(sent_inf) < 0.2
    sent_20 = [q["sent_at_s"] for q in report["results"][0]["requests"]]
    assert sent_20 == sorted(sent_20) and sent_20[-1] > 0.05
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == ["bench.json", "bench.png"]


def test_live_server_concurrency_cap_serialises(server, tmp_path):
    report = run_bench(server, tmp_path / "c.json", "--rates", "inf", "--max-concurrency", "1")
    reqs = sorted(report["results"][0]["requests"], key=lambda q: q["sent_at_s"])
    assert report["results"][0]["completed"] == 8
    for a, b in itertools.pairwise(reqs):  # each is sent only after the one before has ended
        assert b["sent_at_s"] >= a["sent_at_s"] + a["e2e_ms"] / 1000


def test_live_server_refused_requests_are_counted_not_raised(server, tmp_path, capsys):
    # ids from [0, 100000) lie outside the tiny vocabulary: the server refuses each prompt
    report = run_bench(server, tmp_path / "f.json", "--vocab-size", "100000")
    (r,) = report["results"]
    assert (r["completed"], r["failed"]) == (0, 8)
    assert all(e.startswith("HTTP 400: prompt: token id") for e in r["errors"])
    assert r["ttft_ms"] == {"mean": None, "median": None, "p99": None}
    assert "8 requests failed" in capsys.readouterr().err
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")


def test_live_server_timeout_fails_the_test_request(server, tmp_path):
    with pytest.raises(UserError, match="^--url: .* failed a test request: not finished within"):
        bench.main(["--url", server, "--timeout", "0.001", "--output", str(tmp_path / "t.json")])
    assert not (tmp_path / "t.json").exists()


def test_live_server_with_keys(tmp_path, monkeypatch):
    model_dir, db = tmp_path / "model", tmp_path / "keys.db"
    save_chat_model(model_dir)
    with KeyStore(str(db)) as store:
        _, secret = store.create("bench")
    monkeypatch.delenv("PARALLM_API_KEY", raising=False)
    with running_server(model_dir, "--db", str(db), "--served-model-name", "tiny") as url:
        with pytest.raises(UserError, match="^--url: GET /v1/models HTTP 401"):
            bench.main(["--url", url, "--output", str(tmp_path / "none.json")])
        monkeypatch.setenv("PARALLM_API_KEY", secret)
        report = run_bench(url, tmp_path / "k.json", "--rates", "inf")
    assert report["config"]["model"] == "tiny"
    assert report["results"][0]["completed"] == 8
    assert secret not in (tmp_path / "k.json").read_text()


def _medians(ttft: float, tpot: float) -> dict:
    return {"rate": 4.0, "ttft_ms": {"median": ttft}, "tpot_ms": {"median": tpot}}


def test_comparison_over_rounds_is_the_median_of_each_rounds_ratio():
    engines = {  # 3 rounds x 1 rate
        "parallm": [[_medians(10, 2)], [_medians(30, 2)], [_medians(20, 9)]],
        "vllm": [[_medians(20, 1)], [_medians(10, 4)], [_medians(40, 3)]],
    }
    (row,) = bench.comparison(engines)
    assert (row["parallm_ttft_ms"], row["vllm_ttft_ms"]) == (20, 20)
    assert row["ttft_parallm_over_vllm_rounds"] == [0.5, 3.0, 0.5]
    assert row["ttft_parallm_over_vllm"] == 0.5  # not 20 / 20
    assert row["tpot_parallm_over_vllm_rounds"] == [2.0, 0.5, 3.0]
    assert row["tpot_parallm_over_vllm"] == 2.0
    assert "rounds" in bench.format_comparison([row])


def test_launch_restarts_the_server_each_round(tmp_path):
    d = tmp_path / "model"
    save_chat_model(d)
    out = tmp_path / "launch.json"
    argv = ["--launch", str(d), "--rounds", "2", "--rates", "inf", "--num-requests", "3"]
    argv += ["--input-len", "4:8", "--output-len", "3", "--vocab-size", "200"]
    assert bench.main(argv + ["--output", str(out)]) == 0
    report = json.loads(out.read_text())
    rounds = report["engines"]["parallm"]
    assert len(rounds) == 2 and "comparison" not in report  # no peer: nothing to compare
    for (r,) in rounds:
        assert (r["completed"], r["failed"]) == (3, 0)
        assert [q["output_tokens"] for q in r["requests"]] == [3, 3, 3]
    assert report["results"] == rounds[0]
    assert (tmp_path / "launch.parallm.log").read_text().count("parallm serve: bench on") == 2
