"""The web chat page, end to end: a live `parallm serve --ui --video-model` (and a separate
`parallm ui`) driven in headless Chromium. Each reply on the page must be exactly what the API
answers, non-streaming, for the same conversation with greedy decoding; a refusal must show the
server's message; the Video tab turns a prompt into a playable video element."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from parallm.testing.timeouts import scaled
from tests.serve_helpers import free_port, running_server, save_chat_model
from tests.test_video_pipeline import make_video_model

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (`apt-get install chromium`; .ci/run does)",
)
# Headless on a machine without internet: no sandbox (root), no background calls to Google.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_TOKENS = 24
TIMEOUT_MS = int(scaled(30) * 1000)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("ui")
    save_chat_model(d / "model")
    video = make_video_model(d / "video")  # 4 frames of 8 x 8 at 8 fps by default
    with running_server(d / "model", "--no-auth", "--ui", "--video-model", str(video)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as pw:
        # A fresh profile each run (Playwright's own temporary --user-data-dir).
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A page in a fresh context that fails the test if it asks for anything off this machine."""
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    elsewhere: list[str] = []

    def check(request) -> None:
        if not request.url.startswith("http://127.0.0.1:"):
            elsewhere.append(request.url)

    page.on("request", check)
    yield page
    context.close()
    assert not elsewhere, f"the page loaded resources from outside: {elsewhere}"


def open_chat(page, url: str) -> None:
    page.goto(url, timeout=TIMEOUT_MS)
    message_box(page).wait_for(timeout=TIMEOUT_MS)


def set_options(page, *, max_tokens: int, temperature: float) -> None:
    """Open the Options and set two of them."""
    page.get_by_text("Options").click()
    set_number(page, "Max tokens", max_tokens)
    set_number(page, "Temperature", temperature)


def set_number(page, label: str, value: float) -> None:
    field = page.get_by_label(f"number input for {label}")
    slider = page.get_by_label(f"range slider for {label}")
    # A slider's number takes effect on change, and a value typed while the Options were still
    # opening was sometimes dropped (the message then went out with the old value): type it
    # again until the slider holds it, then check with the usual patience.
    for _ in range(5):
        field.fill(str(value))
        field.press("Tab")
        try:
            expect(slider).to_have_value(str(value), timeout=2_000)
            return
        except AssertionError:
            continue
    expect(slider).to_have_value(str(value), timeout=TIMEOUT_MS)


def message_box(page):
    # The first text box (the system prompt comes later); Gradio blanks its placeholder once a
    # message was sent, so the placeholder cannot find it.
    return page.get_by_test_id("textbox").first


def send(page, message: str) -> str:
    """Type `message`, press Enter; the reply's text once the page takes input again."""
    replies = page.get_by_test_id("bot")
    before = replies.count()
    box = message_box(page)
    box.fill(message)
    box.press("Enter")
    expect(replies).to_have_count(before + 1, timeout=TIMEOUT_MS)
    expect(box).to_be_enabled(timeout=TIMEOUT_MS)  # disabled while the reply streams
    return reply_text(replies.nth(before))


def reply_text(reply) -> str:
    assert reply.inner_text().strip(), "the reply is not visible"
    # The rendered text is Markdown of random tokens; the label holds the message as sent.
    return reply.get_attribute("aria-label").removeprefix("bot's message: ")


def api_reply(server: str, messages: list[dict[str, str]]) -> str:
    """The server's greedy, non-streaming answer to `messages`."""
    model = httpx.get(server + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = httpx.post(server + "/v1/chat/completions", json=body, timeout=scaled(60))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_chat_page_streams_the_servers_replies(server, page, tmp_path):
    open_chat(page, server + "/ui/")
    set_options(page, max_tokens=MAX_TOKENS, temperature=0)
    conversation = []
    for message in ("Tell me a story", "Hello there"):
        reply = send(page, message)
        conversation.append({"role": "user", "content": message})
        assert reply, "empty reply"
        assert reply == api_reply(server, conversation)
        conversation.append({"role": "assistant", "content": reply})

    screenshot = tmp_path / "chat.png"
    page.screenshot(path=screenshot, full_page=True)
    assert screenshot.stat().st_size > 0
    print(f"screenshot: {screenshot}")


def test_a_refusal_shows_the_servers_message_and_retry_recovers(server, page):
    model = httpx.get(server + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4096}
    refusal = httpx.post(server + "/v1/chat/completions", json=body)
    assert refusal.status_code == 400  # more than the context of 512 tokens
    refused = f"server answered 400: {refusal.json()['error']['message']}"

    open_chat(page, server + "/ui/")
    set_options(page, max_tokens=4096, temperature=0)
    assert send(page, "Hi") == refused

    set_number(page, "Max tokens", MAX_TOKENS)
    page.get_by_role("button", name="Retry").click()
    reply = page.get_by_test_id("bot").last
    expect(reply).not_to_contain_text(refused, timeout=TIMEOUT_MS)
    expect(message_box(page)).to_be_enabled(timeout=TIMEOUT_MS)
    assert reply_text(reply) == api_reply(server, [{"role": "user", "content": "Hi"}])


def test_parallm_ui_serves_the_page_for_a_server(server, page, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "parallm.cli", "ui", "--server", server, "--port", str(port)]
    log = tmp_path / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + scaled(60)
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url, timeout=scaled(5)).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "parallm ui did not answer in time"
            time.sleep(0.2)
        open_chat(page, url)
        # The Options never opened (Gradio then gives None for their text boxes): sampled.
        assert send(page, "Hi")

        open_chat(page, url)  # a new conversation
        set_options(page, max_tokens=MAX_TOKENS, temperature=0)
        message = "Hello there"
        assert send(page, message) == api_reply(server, [{"role": "user", "content": message}])
    finally:
        proc.terminate()
        proc.wait(30)


def test_parallm_ui_names_an_unreachable_server():
    server = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "parallm.cli", "ui", "--server", server]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled(60))
    assert done.returncode == 2
    assert f"parallm: error: --server: cannot reach {server}" in done.stderr


def test_the_video_tab_plays_the_generated_video(server, page):
    open_chat(page, server + "/ui/")
    page.get_by_role("tab", name="Video").click()
    page.get_by_label("Video prompt").fill("a red circle moving left")
    page.get_by_role("button", name="Generate video").click()
    expect(page.get_by_text("completed", exact=True)).to_be_visible(timeout=TIMEOUT_MS)
    video = page.locator("video").first
    expect(video).to_have_attribute("src", re.compile(r"\S"), timeout=TIMEOUT_MS)
    playable = video.evaluate("v => v.canPlayType('video/mp4; codecs=\"avc1.42E01E\"')")
    if playable:  # a Chromium with H.264: the element has loaded it
        page.wait_for_function(
            "v => v.readyState >= 1 && v.duration > 0", arg=video.element_handle(),
            timeout=TIMEOUT_MS,
        )  # fmt: skip
        assert video.evaluate("v => v.videoWidth") == 8
    # Either way: what the element plays is the server's MP4 of 4 frames of 8 x 8.
    src = video.get_attribute("src")
    response = httpx.get(src if src.startswith("http") else server + src, timeout=scaled(30))
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(response.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 4 and frames[0].shape == (8, 8, 3)
