"""The web chat page: a Gradio chat that streams replies from `/v1/chat/completions`, and, on a
server with a video model, a Video tab (a prompt -> `POST /v1/videos`, polled, the MP4 shown).

`parallm serve --ui` mounts it on the server at /ui (`mount_ui`); `parallm ui --server URL` serves
it on its own (`main`). Either way the page is a plain HTTP client of the OpenAI-compatible API,
so it works the same against a server on another machine. The server's refusals (a missing key,
a rate limit, an over-long conversation) appear in the conversation with the server's message.
Nothing is loaded from the internet: no analytics, no web fonts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
from fastapi import FastAPI

from parallm.errors import UserError
from parallm.serve.sse_client import error_message, parse_sse

# System fonts only: the page must render the same on a machine without internet.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "Consolas", "monospace"],
)
# Connecting should be quick; a reply may wait in the server's queue for a while.
TIMEOUT = httpx.Timeout(10.0, read=600.0)
# Gradio's run history would keep the page's inputs, an API key among them, in the browser.
OPTIONS = {"theme": THEME, "run_history": False}


class ServerError(Exception):
    """The server refused or failed a request; the message is the server's own."""


class ChatClient:
    """Streams chat completions from `server_url`; the model is the server's first one unless
    given."""

    def __init__(self, server_url: str, api_key: str | None, model: str | None = None) -> None:
        self.server_url = server_url.rstrip("/")
        self.api_key = api_key
        self.model = model

    async def stream(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int | None,
        temperature: float,
        api_key: str | None = None,
    ) -> AsyncIterator[str]:
        """Yields the reply so far after each chunk; `ServerError` when the server refuses or
        fails."""
        key = api_key or self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT, headers=headers) as client:
                body: dict[str, Any] = {
                    "model": self.model or await self._first_model(client),
                    "messages": messages,
                    "temperature": temperature,
                    "stream": True,
                }
                if max_tokens:  # 0: as many as the context leaves
                    body["max_tokens"] = max_tokens
                url = self.server_url + "/v1/chat/completions"
                async with client.stream("POST", url, json=body) as response:
                    if response.status_code != 200:
                        await response.aread()
                        raise _server_error(response.status_code, response.text)
                    text = ""
                    async for delta in _deltas(response):
                        text += delta
                        yield text
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach the server at {self.server_url}: {e}") from e

    async def _first_model(self, client: httpx.AsyncClient) -> str:
        response = await client.get(self.server_url + "/v1/models")
        if response.status_code != 200:
            raise _server_error(response.status_code, response.text)
        self.model = response.json()["data"][0]["id"]
        return self.model


async def _deltas(response: httpx.Response) -> AsyncIterator[str]:
    """The content deltas of an OpenAI server-sent event stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        chunk = parse_sse(line)
        if chunk is None:
            continue  # blank separators, comments
        if chunk == "[DONE]":
            return
        if "error" in chunk:  # the server failed after the stream began
            raise ServerError(f"server error: {chunk['error'].get('message', chunk['error'])}")
        for choice in chunk.get("choices", []):
            if content := choice.get("delta", {}).get("content"):
                yield content


def _server_error(status: int, body: str) -> ServerError:
    return ServerError(f"server answered {status}: {error_message(body)}")


def _text(content: Any) -> str:
    """A Gradio chat message's text: a string, or (Gradio 6) a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_text(part) for part in content)
    if isinstance(content, dict) and content.get("type") == "text":
        return content["text"]
    return ""  # files and components are not sent


def build_ui(
    server_url: str, api_key: str | None, model: str | None = None, *, video: bool = False
) -> gr.Blocks:
    """The chat page for the server at `server_url` (with `video`, a Video tab too). `api_key`
    is used when the page's own API key field is empty (None: no key then); `model` None is the
    server's first model, asked at first use."""
    chat = ChatClient(server_url, api_key, model)
    key_label = "API key (empty: the page's own)" if api_key else "API key"

    async def respond(
        message: str,
        history: list[dict[str, Any]],
        system_prompt: str | None,  # None: the Options were never opened
        max_tokens: float,
        temperature: float,
        key: str | None,
    ) -> AsyncIterator[str | gr.ChatMessage]:
        system_prompt = (system_prompt or "").strip()
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [
            {"role": m["role"], "content": _text(m["content"])}
            for m in history
            if not m.get("metadata")  # an error shown by this page, not part of the conversation
        ]
        messages.append({"role": "user", "content": message})
        try:
            async for text in chat.stream(
                messages,
                max_tokens=int(max_tokens),
                temperature=temperature,
                api_key=(key or "").strip(),
            ):
                yield text
        except ServerError as e:
            # In the conversation, not as a gr.Error: after a gr.Error, Gradio 6 leaves the message
            # box disabled; here it stays usable and Retry sends the message again.
            yield gr.ChatMessage(content=str(e), metadata={"title": "Error"})

    chat_page = gr.ChatInterface(
        respond,
        title="parallm chat",
        additional_inputs=[
            gr.Textbox(label="System prompt", lines=2),
            gr.Slider(0, 4096, value=0, step=1, label="Max tokens (0: as many as fit)"),
            gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature"),
            gr.Textbox(label=key_label, type="password"),
        ],
        additional_inputs_accordion=gr.Accordion("Options", open=False),
        analytics_enabled=False,
        # The server batches and queues requests itself; Gradio's default would run one at a time.
        concurrency_limit=None,
        fill_height=True,
    )
    if not video:
        return chat_page
    with gr.Blocks(title="parallm", analytics_enabled=False, fill_height=True) as page:
        with gr.Tab("Chat"):
            chat_page.render()
        with gr.Tab("Video"):
            _video_tab(VideoClient(server_url, api_key), key_label)
    return page


def mount_ui(
    app: FastAPI, server_url: str, api_key: str | None, path: str = "/ui", *, video: bool = False
) -> FastAPI:
    """Serve the chat page for `server_url` on `app` at `path` (with its Video tab if `video`).
    `api_key` (the operator's explicit --ui-api-key) is sent for users who type no key; None:
    each user types their own."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # Gradio's telemetry helpers read only this
    _warn_unused_env_key(api_key, "--ui-api-key")
    page = build_ui(server_url, api_key, video=video)
    return gr.mount_gradio_app(app, page, path=path, **OPTIONS)


def main(args: argparse.Namespace) -> int:
    """`parallm ui`: check that the server answers, then serve the page until stopped. The page
    sends `--api-key` only when given: a key from the environment would be used by anyone who
    can open the page (other users of this machine, or others with --host 0.0.0.0)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    _warn_unused_env_key(args.api_key, "--api-key")
    model = _check_server(args.server, args.api_key)
    page = build_ui(args.server, args.api_key, model, video=_serves_videos(args.server))
    page.launch(server_name=args.host, server_port=args.port, show_error=True, **OPTIONS)
    return 0


def _warn_unused_env_key(api_key: str | None, option: str) -> None:
    if api_key is None and os.environ.get("PARALLM_API_KEY"):
        print(
            f"parallm: the chat page does not send $PARALLM_API_KEY (anyone who opens the page "
            f"would use it); each user types a key in its Options, or give {option}",
            file=sys.stderr,
        )


def _check_server(server_url: str, api_key: str | None) -> str | None:
    """The server's first model when `api_key` is given (None without a key: each user's own
    key finds it at first use); a UserError naming the option at fault."""
    base = server_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(
            base + ("/v1/models" if api_key else "/health"), headers=headers, timeout=10
        )
    except httpx.HTTPError as e:
        raise UserError(f"--server: cannot reach {server_url} ({e})") from e
    if response.status_code in (401, 403):
        raise UserError(f"--api-key: {server_url} refused it ({response.status_code})")
    if response.status_code != 200:
        raise UserError(f"--server: {response.url} answered {response.status_code}")
    return response.json()["data"][0]["id"] if api_key else None


def _serves_videos(server_url: str) -> bool:
    """Whether the server has /v1/videos (its /openapi.json, which needs no key, says so)."""
    try:
        response = httpx.get(server_url.rstrip("/") + "/openapi.json", timeout=10)
        return response.status_code == 200 and "/v1/videos" in response.json().get("paths", {})
    except (httpx.HTTPError, ValueError):
        return False


# -- the Video tab ----------------------------------------------------------------------------------

POLL_S = 0.5


class VideoClient:
    """Creates a video job on `server_url`, polls it and downloads its MP4."""

    def __init__(self, server_url: str, api_key: str | None) -> None:
        self.server_url = server_url.rstrip("/")
        self.api_key = api_key

    async def generate(self, body: dict[str, Any], api_key: str | None) -> AsyncIterator[Any]:
        """Yields the job (a dict) after each poll, then the MP4's bytes once completed;
        `ServerError` when the server refuses or the job fails."""
        key = api_key or self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = self.server_url + "/v1/videos"
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT, headers=headers) as client:
                job = _answer(await client.post(url, json=body))
                while job["status"] in ("queued", "in_progress"):
                    yield job
                    await asyncio.sleep(POLL_S)
                    job = _answer(await client.get(f"{url}/{job['id']}"))
                if job["status"] != "completed":
                    error = job.get("error") or {}
                    raise ServerError(f"the video failed: {error.get('message', job['status'])}")
                yield job
                content = await client.get(f"{url}/{job['id']}/content")
                if content.status_code != 200:
                    raise _server_error(content.status_code, content.text)
                yield content.content
        except httpx.HTTPError as e:
            raise ServerError(f"cannot reach the server at {self.server_url}: {e}") from e


def _answer(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise _server_error(response.status_code, response.text)
    return response.json()


def _video_tab(client: VideoClient, key_label: str) -> None:
    """A prompt, the video's options and a Generate button; the video plays below it."""
    prompt = gr.Textbox(label="Video prompt", placeholder="a red circle moving left", lines=2)
    with gr.Accordion("Video settings", open=False):
        size = gr.Textbox(label="Size (WIDTHxHEIGHT; empty: the model's)")
        frames = gr.Number(label="Frames (0: the model's)", value=0, precision=0, minimum=0)
        steps = gr.Number(label="Steps", value=30, precision=0, minimum=1)
        guidance = gr.Number(label="Guidance", value=7.0, minimum=0)
        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
        key = gr.Textbox(label=key_label, type="password")
    button = gr.Button("Generate video", variant="primary")
    status = gr.Markdown()
    player = gr.Video(label="Video", interactive=False, loop=True)

    async def make(
        text: str, wxh: str, n: float, s: float, g: float, k: float, api_key: str | None
    ) -> AsyncIterator[tuple[Any, str]]:
        body: dict[str, Any] = {"prompt": text, "steps": int(s), "guidance": float(g)}
        body["seed"] = int(k)
        if (wxh or "").strip():
            body["size"] = wxh.strip()
        if n:
            body["frames"] = int(n)
        try:
            async for got in client.generate(body, (api_key or "").strip()):
                if isinstance(got, dict):
                    yield None, f"{got['status']}: {got['progress']}% ({got['id']})"
                    continue
                # Gradio copies the file into its cache when it is yielded.
                with tempfile.TemporaryDirectory(prefix="parallm-ui-") as d:
                    path = Path(d) / "video.mp4"
                    path.write_bytes(got)
                    yield str(path), "completed"
        except ServerError as e:
            yield None, str(e)

    button.click(
        make,
        inputs=[prompt, size, frames, steps, guidance, seed, key],
        outputs=[player, status],
        concurrency_limit=None,  # the server queues video jobs itself
    )
