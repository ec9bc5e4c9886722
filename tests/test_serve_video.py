"""Video generation behind the API (OpenAI's video API shape): create -> poll -> an MP4 that is
exactly what `VideoPipeline.generate` gives for the same seed, billed in frames to the key;
keys (401, another key's job is 404), 400s naming the field, queued jobs, cancelling, text
completions served while a video generates, the schema fuzzer on the video routes, and
`parallm serve --video-model` draining with a job running."""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, Phase, given, settings

from parallm.serve.app import build_app
from parallm.serve.keystore import KeyStore
from parallm.serve.video_jobs import VideoLimits, VideoService
from parallm.testing.timeouts import scaled
from tests.serve_helpers import bearer, save_chat_model, schema_fuzzer
from tests.test_serve_contract import MODEL, live, make_state
from tests.test_serve_drain import Server, assert_clean_exit
from tests.test_video_pipeline import make_video_model

VIDEO_MODEL = "tiny-video"
LIMITS = VideoLimits(max_frames=8, max_pixels=32 * 32, max_steps=4000)
REQUEST = {"prompt": "a red circle moving left", "frames": 4, "size": "12x8", "steps": 3}
LONG = {"prompt": "a blue square moving up", "frames": 8, "size": "32x32", "steps": 4000}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("video")
    save_chat_model(d / "chat")
    return make_video_model(d / "video"), d / "chat"


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    """A live server with keys, a text model and the video model (one worker thread, so that
    the test's reference generation can use the same count); yields (url, store, user secret,
    user key id, other secret)."""
    video_dir, chat_dir = dirs
    store = KeyStore(str(tmp_path_factory.mktemp("keys") / "keys.db"))
    user, user_secret = store.create("user")
    _, other_secret = store.create("other")
    videos = VideoService(str(video_dir), name=VIDEO_MODEL, limits=LIMITS, threads=1, max_queued=8)
    videos.load()
    state = make_state(chat_dir, store)
    state.videos = videos
    with live(build_app(state, log_format=None)) as url:
        yield url, store, user_secret, user.id, other_secret
    store.close()


def create(url: str, secret: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/videos", json=body, headers=bearer(secret))
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(url: str, secret: str, video_id: str, statuses: tuple[str, ...]) -> dict:
    """Poll until the job's status is one of `statuses` (a failure on timeout)."""
    deadline = time.monotonic() + scaled(120)
    while True:
        job = httpx.get(f"{url}/v1/videos/{video_id}", headers=bearer(secret)).json()
        if job["status"] in statuses:
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def decode(mp4: bytes) -> np.ndarray:
    """uint8 (T, H, W, 3) of an MP4."""
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def reference_mp4(video_dir: Path, tmp_path: Path, **kwargs) -> bytes:
    """What `VideoPipeline.generate` gives for the request, written as the server writes it,
    generated on one torch thread like the server's worker."""
    from parallm.video.io import write_video
    from parallm.video.pipeline import VideoPipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = VideoPipeline.load(video_dir)
        video = pipe.generate([kwargs.pop("prompt")], **kwargs)
    finally:
        torch.set_num_threads(threads)
    path = write_video(tmp_path / "reference.mp4", video[0], pipe.config.fps)
    return path.read_bytes()


def test_create_poll_content_is_the_pipelines_video_billed_in_frames(server, dirs, tmp_path):
    url, store, secret, key_id, _ = server
    job = create(url, secret, {**REQUEST, "seed": 5, "guidance": 3.0})
    assert job["object"] == "video" and job["model"] == VIDEO_MODEL
    assert job["status"] in ("queued", "in_progress") and job["size"] == "12x8"
    assert job["seconds"] == "0.5" and job["frames"] == 4  # video.json: fps 8
    done = wait_for(url, secret, job["id"], ("completed", "failed"))
    assert done["status"] == "completed" and done["progress"] == 100, done
    assert done["completed_at"] >= done["created_at"]
    metrics = httpx.get(url + "/metrics").text
    assert f'parallm_video_frames_total{{model_name="{VIDEO_MODEL}"}} 4.0' in metrics

    r = httpx.get(f"{url}/v1/videos/{job['id']}/content", headers=bearer(secret))
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    frames = decode(r.content)
    assert frames.shape == (4, 8, 12, 3)  # the requested frames and size
    expected = reference_mp4(
        dirs[0], tmp_path, prompt=REQUEST["prompt"], frames=4, height=8, width=12, steps=3,
        guidance=3.0, seed=5,
    )  # fmt: skip
    np.testing.assert_array_equal(frames, decode(expected))

    listed = httpx.get(url + "/v1/videos", headers=bearer(secret)).json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == job["id"]
    usage = store.usage(key_id=key_id)
    assert [(u.requests, u.video_frames, u.prompt_tokens, u.completion_tokens) for u in usage] == [
        (1, 4, 0, 0)
    ]
    seconds = create(url, secret, {**REQUEST, "frames": None, "seconds": "1"})
    assert seconds["frames"] == 8 and seconds["seconds"] == "1"  # 1 s at 8 fps
    wait_for(url, secret, seconds["id"], ("completed",))


def test_models_lists_the_video_model(server):
    url, _, secret, _, _ = server
    listed = httpx.get(url + "/v1/models", headers=bearer(secret)).json()["data"]
    assert [m["id"] for m in listed][-1] == VIDEO_MODEL and len(listed) == 2
    card = httpx.get(f"{url}/v1/models/{VIDEO_MODEL}", headers=bearer(secret)).json()
    assert card["id"] == VIDEO_MODEL and card["object"] == "model"


def test_keys_401_and_another_keys_job_is_404(server):
    url, _, secret, _, other = server
    job = create(url, secret, REQUEST)
    for method, path in (
        ("POST", "/v1/videos"),
        ("GET", "/v1/videos"),
        ("GET", f"/v1/videos/{job['id']}"),
        ("GET", f"/v1/videos/{job['id']}/content"),
        ("DELETE", f"/v1/videos/{job['id']}"),
    ):
        r = httpx.request(method, url + path, json=REQUEST if method == "POST" else None)
        assert r.status_code == 401, (method, path, r.text)
        if method != "POST":
            r = httpx.request(method, url + path, headers=bearer(other))
            assert r.status_code == (200 if path == "/v1/videos" else 404), (method, path)
    listed = httpx.get(url + "/v1/videos", headers=bearer(other)).json()["data"]
    assert job["id"] not in {v["id"] for v in listed}
    wait_for(url, secret, job["id"], ("completed",))


@pytest.mark.parametrize(
    "change, field",
    [
        ({"prompt": None}, "prompt"),
        ({"prompt": "  "}, "prompt"),
        ({"size": "12by8"}, "size"),
        ({"size": "13x8"}, "size"),  # odd: H.264 4:2:0
        ({"size": "64x64"}, "size"),  # over --max-video-pixels
        ({"frames": 0}, "frames"),
        ({"frames": 9}, "frames"),  # over --max-video-frames
        ({"steps": 0}, "steps"),
        ({"steps": 4001}, "steps"),
        ({"model": "sora-2"}, "model"),
        ({"frames": None, "seconds": "soon"}, "seconds"),
        ({"seconds": "1"}, "seconds"),  # and frames
        ({"guidance": -1.0}, "guidance"),
        ({"seed": -1}, "seed"),
        ({"frames": "4"}, "frames"),
        ({"fps": 30}, "fps"),
    ],
)
def test_bad_requests_are_400_naming_the_field(server, change, field):
    url, _, secret, _, _ = server
    body = {k: v for k, v in {**REQUEST, **change}.items() if v is not None}
    r = httpx.post(url + "/v1/videos", json=body, headers=bearer(secret))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith(f"{field}: "), error
    assert error["param"] in (field, None)


def test_queued_jobs_content_404_until_completed_and_cancelling(server):
    url, store, secret, key_id, _ = server
    before = {u.key_id: u for u in store.usage()}[key_id]
    running = create(url, secret, LONG)
    queued = create(url, secret, REQUEST)
    assert httpx.get(f"{url}/v1/videos/{queued['id']}", headers=bearer(secret)).json()[
        "status"
    ] == ("queued")
    r = httpx.get(f"{url}/v1/videos/{running['id']}/content", headers=bearer(secret))
    assert r.status_code == 404 and r.json()["error"]["code"] == "video_not_ready"
    for job in (queued, running):
        r = httpx.delete(f"{url}/v1/videos/{job['id']}", headers=bearer(secret))
        assert r.json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
        assert httpx.get(f"{url}/v1/videos/{job['id']}", headers=bearer(secret)).status_code == 404
    # The worker stops the cancelled job between two steps and takes the next.
    after = create(url, secret, REQUEST)
    assert wait_for(url, secret, after["id"], ("completed", "failed"))["status"] == "completed"
    usage = {u.key_id: u for u in store.usage()}[key_id]
    assert usage.requests - before.requests == 3
    assert usage.video_frames - before.video_frames == 4  # cancelled jobs bill 0 frames


def test_text_completions_are_served_while_a_video_generates(server):
    """The completion must come back while the long video job is still running (it has 4000
    sampling steps, each many times a whole completion's work), not after it."""
    url, _, secret, _, _ = server
    job = create(url, secret, LONG)
    wait_for(url, secret, job["id"], ("in_progress",))
    body = {"model": MODEL, "prompt": "def f", "max_tokens": 16, "ignore_eos": True}
    for _ in range(3):
        r = httpx.post(url + "/v1/completions", json=body, headers=bearer(secret), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    status = httpx.get(f"{url}/v1/videos/{job['id']}", headers=bearer(secret)).json()["status"]
    assert status == "in_progress"
    httpx.delete(f"{url}/v1/videos/{job['id']}", headers=bearer(secret))


def test_schema_fuzzer_on_the_video_routes(server):
    """Generated cases (valid and invalid) against the video routes: every response declared
    in /openapi.json, no 5xx; each route answers 200 at least once."""
    url, _, secret, _, _ = server
    schema, call, statuses = schema_fuzzer(url, secret)

    job = create(url, secret, REQUEST)
    wait_for(url, secret, job["id"], ("completed",))
    videos, one = schema["/v1/videos"], schema["/v1/videos/{video_id}"]
    ids = {"video_id": job["id"]}
    call(videos["POST"].Case(body=REQUEST))
    call(videos["GET"].Case())
    call(one["GET"].Case(path_parameters=ids))
    call(schema["/v1/videos/{video_id}/content"]["GET"].Case(path_parameters=ids))
    call(one["DELETE"].Case(path_parameters=ids))
    for result in schema.get_all_operations():
        op = result.ok()
        if not op.path.startswith("/v1/videos"):
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            if mode is schemathesis.GenerationMode.NEGATIVE and not (
                len(op.body) or len(op.path_parameters)
            ):
                continue

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=8,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case) -> None:
                call(case)

            fuzz()
    assert len(statuses) == 5
    assert all(200 in seen for seen in statuses.values()), statuses
    # Jobs the fuzzer queued: cancelled, so that the next test's server is idle.
    for video in httpx.get(url + "/v1/videos?limit=100", headers=bearer(secret)).json()["data"]:
        if video["status"] in ("queued", "in_progress"):
            httpx.delete(f"{url}/v1/videos/{video['id']}", headers=bearer(secret))


def test_parallm_serve_video_model_drains_a_running_job(dirs, tmp_path):
    """`parallm serve --video-model`: a job running at SIGTERM fails at once (its polls would
    get 503), is billed 0 frames, and the server exits 0 without a traceback."""
    video_dir, chat_dir = dirs
    db = tmp_path / "keys.db"
    with KeyStore(str(db)) as store:
        info, secret = store.create("user")
    server = Server(chat_dir, db, "--video-model", str(video_dir), "--max-video-steps", "4000")
    try:
        job = create(server.url, secret, {**LONG, "model": str(video_dir)})
        wait_for(server.url, secret, job["id"], ("in_progress",))
        server.proc.send_signal(signal.SIGTERM)
        out = assert_clean_exit(server)
        assert "SIGTERM: ended 1 video job(s)" in out and "failed" not in out, out
    finally:
        server.close()
    with KeyStore(str(db)) as store:
        usage = store.usage(key_id=info.id)
    assert [(u.requests, u.video_frames) for u in usage] == [(1, 0)]


def test_usage_in_frames_older_databases_and_the_usage_table(tmp_path):
    """A key database made before videos gets `video_frames` (0 for its requests) when opened;
    `parallm keys usage` shows a VIDEO FRAMES column once videos were generated."""
    import sqlalchemy as sa

    from parallm.serve.keystore import format_usage

    db = tmp_path / "old.db"
    with KeyStore(str(db)) as store:
        info, _ = store.create("user")
        store.record_usage(
            info.id, request_id="r1", model="m", prompt_tokens=3, completion_tokens=4,
            endpoint="completions",
        )  # fmt: skip
    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE api_usage DROP COLUMN video_frames"))
    engine.dispose()
    with KeyStore(str(db)) as store:
        assert "VIDEO" not in format_usage(store.usage())
        store.record_usage(
            info.id, request_id="v1", model="v", prompt_tokens=0, completion_tokens=0,
            endpoint="videos", video_frames=16,
        )  # fmt: skip
        (summary,) = store.usage()
        table = format_usage(store.usage())
    assert (summary.requests, summary.total_tokens, summary.video_frames) == (2, 7, 16)
    assert table.splitlines()[0].endswith("TOTAL TOKENS  VIDEO FRAMES")
    assert table.splitlines()[1].split()[-2:] == ["7", "16"]


def test_openais_client_creates_polls_and_downloads(server):
    """OpenAI's Python SDK (which sends the create request as a multipart form) end to end."""
    import openai

    url, _, secret, _, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=secret, max_retries=0)
    with pytest.warns(DeprecationWarning):  # the SDK marks its video methods deprecated
        video = client.videos.create_and_poll(
            prompt="a blue square moving up", seconds="1", size="8x8", model=VIDEO_MODEL,
            extra_body={"steps": 2, "seed": 3}, poll_interval_ms=50,
        )  # fmt: skip
        assert (video.status, video.seconds, video.size) == ("completed", "1", "8x8")
        assert (video.frames, video.steps, video.seed) == (8, 2, 3)  # parallm's fields
        content = client.videos.download_content(video.id).read()
    assert decode(content).shape == (8, 8, 8, 3)
    with pytest.warns(DeprecationWarning), pytest.raises(openai.BadRequestError, match="size"):
        client.videos.create(prompt="a blue square", size="1280x720")  # over the limit
