"""`parallm` command line: thin wrappers over the Python API.

A `UserError` (or a bad argument) prints one line on stderr and exits 2; a bug keeps its
traceback and exits 1. The server's modules are imported only by the commands that need them
(serve, ui, keys, bench serve), so a training-only install (no `serve` extra) runs the rest.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields

from parallm.errors import UserError
from parallm.extras import import_extra
from parallm.serve.config import DEFAULT_KEYS_DB, ServerConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        sub = self.prog.removeprefix("parallm").strip()
        raise UserError(f"{sub}: {message}" if sub else message)


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Check everything that needs no rank (one line, exit 2, nothing started), then train in
    this process, or start the ranks under torchrun's elastic agent (`distributed/launch.py`)."""
    from parallm.config import JobConfig, load_config
    from parallm.distributed.launch import LaunchOptions

    opts = LaunchOptions(
        nproc=args.nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        max_restarts=args.max_restarts,
        standalone=args.standalone,
    )
    cfg = load_config(JobConfig, args.job, overrides)
    from parallm.train.preflight import preflight  # torch: only once the job file is valid

    preflight(cfg, opts.world_size, resume=args.resume)
    if not opts.needs_agent:
        from parallm.train.__main__ import run

        return run(args.job, overrides, resume=args.resume)
    from pathlib import Path

    from parallm.distributed.launch import launch
    from parallm.train.checkpoint_dirs import remove_all, remove_stale

    root = Path(cfg.output.dir) / "checkpoints"
    remove_stale(root)  # nothing saves before launch (rank 0 also does it at start)
    resume = args.resume
    if resume == "never":  # now, once: ranks restarted by the agent resume this job's own
        removed = remove_all(root)
        if removed:
            print(f"parallm: --resume never: removed {len(removed)} checkpoints in {root}")
        resume = "auto"
    print(f"parallm: starting {opts.describe()}", flush=True)
    return launch("parallm.train", [args.job, f"--resume={resume}", *overrides], opts)


def _merge(args: argparse.Namespace) -> int:
    from parallm.merge import merge

    out = merge(args.model, args.adapter, args.out, force=args.force)
    print(f"saved merged model {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from parallm.utils.fs import model_dir, read_json

    read_json(model_dir(args.model) / "config.json")  # before torch: a wrong path answers at once
    from parallm.inference.llm import LLM
    from parallm.inference.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    lora = _generate_lora(args)
    llm = LLM(
        args.model,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=1,
        **lora,
    )
    try:
        if lora:
            llm.engine.add_lora("adapter", args.lora, field="--lora")
        prompt: str | list[int] = args.prompt
        if args.chat:
            messages = [{"role": "user", "content": args.prompt}]
            text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            prompt = llm.tokenizer.encode(text, add_special_tokens=False)
        engine = llm.engine
        engine.add_request("cli", prompt, params, lora="adapter" if lora else None)
        shown = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.error:
                    raise UserError(out.error)
                text = out.outputs[0].text  # whole characters only, stop strings held back
                sys.stdout.write(text[len(shown) :])
                sys.stdout.flush()
                shown = text
        sys.stdout.write("\n")
    finally:
        llm.close()
    return 0


def _generate_lora(args: argparse.Namespace) -> dict:
    """The engine options for `--lora DIR`, its adapter checked against the model's config
    first (before the weights load); {} without it."""
    if args.lora is None:
        return {}
    from parallm.inference.lora import check_servable, servable_modules
    from parallm.models.hf import read_family
    from parallm.models.peft_format import read_adapter

    _, model_args = read_family(args.model)
    adapter = read_adapter(args.lora, model_args, field="--lora")
    modules = set(servable_modules(model_args))
    check_servable(adapter, modules=modules, max_rank=adapter.spec.r, field="--lora")
    return dict(enable_lora=True, max_loras=1, max_lora_rank=adapter.spec.r)


def _video_generate(args: argparse.Namespace) -> int:
    """Check the options and the model directory without torch (one line, exit 2), then load the
    pipeline, generate one clip and write it (and a GIF beside it with --gif)."""
    import time
    from pathlib import Path

    from parallm.utils.fs import model_dir, read_json

    out = Path(args.out)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(
            f"--out: {args.out!r} is not valid; name a {' or '.join(VIDEO_SUFFIXES)} file"
        )
    for name in ("frames", "height", "width", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name}: {value} is not valid; must be >= 1")
    if args.guidance < 0:
        raise UserError(f"--guidance: {args.guidance} is not valid; must be >= 0 (1: no guidance)")
    if args.fps is not None and args.fps <= 0:
        raise UserError(f"--fps: {args.fps} is not valid; must be > 0")
    if not args.prompt.strip():
        raise UserError(f"--prompt: {args.prompt!r} is not valid; give the text of the video")
    d = model_dir(args.model)
    model_type = read_json(d / "config.json").get("model_type")
    if model_type != "STDiT3":
        raise UserError(
            f"--model: {args.model!r} is a {model_type!r} model, not a video model (STDiT3)"
        )
    import_extra("av", command="video generate", extra="video")
    start = time.perf_counter()
    from parallm.video.io import write_video
    from parallm.video.pipeline import VideoPipeline

    pipe = VideoPipeline.load(d, device=args.device or "cpu", dtype=args.dtype or "float32")
    video = pipe.generate(
        [args.prompt],
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        fps=args.fps,
    )[0]
    fps = args.fps or pipe.config.fps
    paths = [out] + ([out.with_suffix(".gif")] if args.gif and out.suffix.lower() != ".gif" else [])
    for path in paths:
        write_video(path, video, fps)
    _, t, h, w = video.shape
    wrote = " and ".join(str(p) for p in paths)
    print(
        f"wrote {wrote}: {t} frames {w}x{h} at {fps:g} fps in {time.perf_counter() - start:.1f} s"
    )
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    if args.what == "video":
        return _bench_video(rest)
    if args.what == "serve":
        from parallm.bench import serve as bench_serve

        bench_serve.parse_config(rest)  # --help and option errors before the extra's imports
        for module in ("httpx", "matplotlib"):
            import_extra(module, command="bench serve", extra="serve")
        return bench_serve.main(rest)
    if args.what == "infer":
        from parallm.bench import infer

        return infer.main(rest)
    if args.what == "rl":
        from parallm.bench import rl

        return rl.main(rest)
    from parallm.bench import train as bench_train

    parsed = bench_train.parser().parse_args(rest)
    if parsed.nproc <= 1 or parsed.task == "sft":  # sft starts its own processes
        return bench_train.main(rest)
    from parallm.distributed.launch import LaunchOptions, launch

    opts = LaunchOptions(nproc=parsed.nproc)
    bench_train.preflight_job(parsed, opts.world_size)  # one line, exit 2, before any rank
    print(f"parallm: starting {opts.describe()}", flush=True)
    return launch("parallm.bench.train", rest, opts)


def _bench_video(rest: list[str]) -> int:
    from parallm.bench import video as bench_video

    parsed = bench_video.parser().parse_args(rest)
    bench_video.check_args(parsed)  # one line, exit 2, before torch
    if parsed.nproc <= 1:
        return bench_video.main(rest)
    from parallm.distributed.launch import LaunchOptions, launch

    opts = LaunchOptions(nproc=parsed.nproc)
    bench_video.preflight_job(parsed, opts.world_size)
    print(f"parallm: starting {opts.describe()}", flush=True)
    return launch("parallm.bench.video", rest, opts)


def _plan(args: argparse.Namespace) -> int:
    from parallm.planner.report import plan_command, plan_json

    fn = plan_json if args.json else plan_command
    print(
        fn(
            args.model,
            args.gpus,
            args.gpu_memory,
            args.seq_len,
            args.batch,
            args.micro_batch,
            zero_stage=args.zero_stage,
            activation_checkpoint=args.activation_checkpoint,
        )
    )
    return 0


def _keys(args: argparse.Namespace) -> int:
    import_extra("parallm.serve.keystore", command="keys", extra="serve")
    from parallm.serve.keystore import KeyStore, format_keys, format_usage, parse_since

    with KeyStore(args.db) as store:
        if args.action == "create":
            info, secret = store.create(args.name, rpm=args.rpm, tpm=args.tpm, admin=args.admin)
            scope = ", admin" if info.admin else ""
            print(f"created {info.id} ({info.name}{scope}); the key is shown once, store it now:")
            print(secret)
        elif args.action == "list":
            print(format_keys(store.list()))
        elif args.action == "revoke":
            info = store.revoke(args.id)
            print(f"revoked {info.id} ({info.name})")
        else:
            since = parse_since(args.since) if args.since else None
            print(format_usage(store.usage(since=since, by_model=args.by_model)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    args.lora = tuple(args.lora or ())  # repeated --lora NAME=DIR
    config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    import_extra("parallm.serve.server", command="serve", extra="serve")
    from parallm.serve.server import serve

    return serve(config)


def _ui(args: argparse.Namespace) -> int:
    import_extra("parallm.serve.ui", command="ui", extra="ui")
    from parallm.serve.ui import main as ui_main

    return ui_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="parallm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser(
        "train",
        help="train a model from a TOML job file",
        description="Train from a TOML job file; override any field as --section.key value.",
    )
    train.add_argument("job", help="job file (TOML), e.g. configs/demo.toml")
    _add_launch_options(train)

    gen = sub.add_parser("generate", help="generate text from a Hugging Face model directory")
    gen.add_argument("--model", required=True, help="model directory (HF format)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument(
        "--dtype", default=None, help="float32 | bfloat16 | float16 (default: model's)"
    )
    gen.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    gen.add_argument(
        "--tensor-parallel-size", type=int, default=1, help="processes sharing the model"
    )
    gen.add_argument("--lora", default=None, help="generate through this LoRA adapter (peft dir)")
    merge = sub.add_parser(
        "merge", help="fold a LoRA adapter (peft format) into its base model: a new HF directory"
    )
    merge.add_argument("--model", required=True, help="base model directory (HF format)")
    merge.add_argument("--adapter", required=True, help="LoRA adapter directory (peft format)")
    merge.add_argument("--out", required=True, help="directory to write the merged model to")
    merge.add_argument("--force", action="store_true", help="replace --out if it is not empty")
    plan = sub.add_parser(
        "plan",
        help="predict memory and communication per layout; recommend the fastest that fits",
    )
    plan.add_argument("--model", required=True, help="model directory (its config.json)")
    plan.add_argument("--gpus", type=int, required=True)
    plan.add_argument("--gpu-memory", type=float, required=True, help="GiB per GPU, e.g. 80")
    plan.add_argument("--seq-len", type=int, default=4096)
    plan.add_argument("--batch", type=int, default=64, help="global sequences per step")
    plan.add_argument("--micro-batch", type=int, default=1)
    plan.add_argument(
        "--zero-stage", type=int, default=3, help="ZeRO stage of sharded layouts (1, 2, 3)"
    )
    plan.add_argument(
        "--activation-checkpoint",
        default="none",
        help="none | selective | full (as parallel.activation_checkpoint)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")

    db_help = f"key database: a SQLite path or a SQLAlchemy URL (default {DEFAULT_KEYS_DB})"
    keys = sub.add_parser("keys", help="API keys of the server: create, list, revoke, usage")
    _add_keys_actions(keys, db_help)
    serve = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API")
    _add_serve_options(serve, db_help)

    ui = sub.add_parser("ui", help="a web chat page for a running `parallm serve`")
    ui.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    ui.add_argument(
        "--api-key",
        default=None,
        help="the key the page sends when its user types none (default: none; never read from "
        "$PARALLM_API_KEY, as anyone who can open the page would use it)",
    )
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=7860)

    video = sub.add_parser(
        "video",
        help="text-to-video: generate clips with a trained STDiT3 model",
        description="Text-to-video with a model directory written by `parallm train` "
        "(task flow): STDiT3 config.json + model.safetensors + video.json.",
    )
    _add_video_commands(video)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: train, infer, serve, video (`parallm bench --help` lists them)",
        description="Benchmarks; `parallm bench NAME --help` shows a benchmark's options.",
    )
    _add_benchmarks(bench)
    return parser


VIDEO_SUFFIXES = (".mp4", ".gif")


def _add_video_commands(video: argparse.ArgumentParser) -> None:
    actions = video.add_subparsers(dest="action", required=True, parser_class=_Parser)
    gen = actions.add_parser(
        "generate",
        help="generate a clip from a text prompt; write it as MP4 (H.264) or GIF",
        description="Generate a clip from a text prompt with rectified-flow Euler sampling and "
        "classifier-free guidance, and write it as MP4 (H.264) or GIF (by the suffix of --out). "
        "The same seed gives the same video. Frames, height and width default to the size the "
        "model was trained at (its video.json); sizes that are not a multiple of the patch "
        "are padded by the model and cropped back, as in Open-Sora; with a VAE, height and "
        "width must be multiples of its downsampling factor.",
        epilog="example: parallm video generate --model runs/video-demo/hf "
        '--prompt "a red circle moving left" --steps 30 --guidance 4 --seed 1 --out clip.mp4 --gif',
    )
    gen.add_argument("--model", required=True, help="model directory (STDiT3 + video.json)")
    gen.add_argument("--prompt", required=True, help="what the video shows")
    gen.add_argument("--frames", type=int, default=None, help="default: the model's")
    gen.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="pixels (default: the model's)")
    gen.add_argument("--steps", type=int, default=30, help="Euler sampling steps (default 30)")
    gen.add_argument(
        "--guidance",
        type=float,
        default=7.0,
        help="classifier-free guidance scale (default 7; 1: conditional only, no guidance)",
    )
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    gen.add_argument("--fps", type=float, default=None, help="frame rate (default: the model's)")
    gen.add_argument(
        "--out", default="video.mp4", help="output file, .mp4 or .gif (default video.mp4)"
    )
    gen.add_argument("--gif", action="store_true", help="also write a GIF beside the MP4")
    gen.add_argument("--device", default=None, help="cpu | cuda (default: cpu)")
    gen.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default float32)")


BENCHMARKS = {
    "train": "training tokens/s, MFU and peak memory of a model shape on any layout; "
    "SFT and LoRA against transformers + peft",
    "infer": "offline generation throughput (or --latency), parallm against transformers or "
    "vLLM (--peer) on the same weights",
    "serve": "latency (TTFT, TPOT, ITL) and throughput of a running server under Poisson load",
    "rl": "the GRPO step with parallm's engine for rollouts against transformers.generate on "
    "the same weights",
    "video": "STDiT3 training samples/s and patches/s per device on any layout (sequence "
    "parallel too), peak memory, generation seconds per clip",
}


def _add_benchmarks(bench: argparse.ArgumentParser) -> None:
    """One entry per benchmark, listed by `parallm bench --help`; each benchmark's own options
    are its module's parser (the rest of the command line goes to it, `--help` too)."""
    names = bench.add_subparsers(
        dest="what", required=True, parser_class=_Parser, metavar="{" + ",".join(BENCHMARKS) + "}"
    )
    for name, line in BENCHMARKS.items():
        names.add_parser(name, help=line, add_help=False)


def _add_launch_options(train: argparse.ArgumentParser) -> None:
    """`parallm train`'s resume mode and where its ranks run (torchrun's elastic agent)."""
    from parallm.train.__main__ import add_resume_option

    add_resume_option(train)
    train.add_argument(
        "--nproc", type=int, default=1, help="processes on this node (> 1: torchrun's agent)"
    )
    train.add_argument("--nnodes", type=int, default=1, help="nodes of the job (default 1)")
    train.add_argument(
        "--node-rank", type=int, default=0, help="this node's index (0 hosts the rendezvous)"
    )
    train.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="where node 0 hosts the c10d rendezvous (the same on every node; multi-node)",
    )
    train.add_argument("--rdzv-id", default=None, help="the job's name, the same on every node")
    train.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart every rank this often after one fails (with --resume auto: resumes)",
    )
    train.add_argument(
        "--standalone",
        action="store_true",
        help="a private rendezvous on this node (the default for one node)",
    )


def _add_keys_actions(keys: argparse.ArgumentParser, db_help: str) -> None:
    keys_sub = keys.add_subparsers(dest="action", required=True, parser_class=_Parser)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, default=None, help="requests per minute limit")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute limit")
    create.add_argument(
        "--admin", action="store_true", help="admin scope: may load / unload adapters"
    )
    listing = keys_sub.add_parser("list", help="list keys (prefixes only)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")
    usage = keys_sub.add_parser(
        "usage", help="prompt and completion tokens (and video frames) per key"
    )
    usage.add_argument("--since", default=None, help="ISO date/time or an age: 24h, 7d")
    usage.add_argument(
        "--by-model", action="store_true", help="a row per key and model (base or adapter)"
    )
    for p in (create, listing, revoke, usage):
        p.add_argument("--db", default=DEFAULT_KEYS_DB, help=db_help)


def _add_serve_options(serve: argparse.ArgumentParser, db_help: str) -> None:
    """One option per `ServerConfig` field, with its defaults."""
    serve.add_argument("--model", required=True, help="model directory (HF format)")
    serve.add_argument("--served-model-name", help="name in the API (default: --model)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--tensor-parallel-size", type=int)
    serve.add_argument("--max-model-len", type=int, help="default: model's context")
    serve.add_argument(
        "--kv-cache-memory", type=float, help="bytes, or a fraction <= 1 of GPU memory"
    )
    serve.add_argument("--max-num-seqs", type=int, help="sequences per step")
    serve.add_argument("--max-num-batched-tokens", type=int, help="tokens per step")
    serve.add_argument("--max-waiting", type=int, help="queued requests before 429")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit")
    serve.add_argument("--no-prefix-caching", action="store_true")
    serve.add_argument("--dtype", help="float32 | bfloat16 | float16")
    serve.add_argument("--device", help="cpu | cuda")
    serve.add_argument("--attention-backend", help="auto | portable | flex")
    serve.add_argument("--db", help=db_help)
    serve.add_argument(
        "--no-auth", action="store_true", help="accept requests without a key (local use)"
    )
    serve.add_argument("--ui", action="store_true", help="also serve the chat page at /ui")
    serve.add_argument("--log-level", help="uvicorn log level")
    serve.add_argument(
        "--lora",
        action="append",
        metavar="NAME=DIR",
        help="serve a LoRA adapter (peft dir) as model NAME; repeat for more",
    )
    serve.add_argument(
        "--enable-lora", action="store_true", help="adapter slots for admin keys to load into"
    )
    serve.add_argument("--max-loras", type=int, help="adapters loaded at a time")
    serve.add_argument("--max-lora-rank", type=int, help="largest adapter rank")
    serve.add_argument(
        "--max-prompt-chars",
        type=int,
        help="characters per prompt, checked before tokenizing (default: 16 x context)",
    )
    serve.add_argument("--max-n", type=int, help="largest n / best_of (choices per prompt)")
    serve.add_argument(
        "--drain-timeout",
        type=float,
        help="seconds running requests may finish after SIGTERM / SIGINT; then they are ended",
    )
    serve.add_argument("--log-format", help="text | json: the access log's lines")
    serve.add_argument("--no-access-log", action="store_true", help="log no requests")
    serve.add_argument(
        "--metrics-auth", action="store_true", help="/metrics answers only with a valid API key"
    )
    serve.add_argument(
        "--ui-api-key", help="the key the chat page sends when its user types none (default: none)"
    )
    serve.add_argument(
        "--video-model",
        help="also serve this video model directory (parallm train, task flow) at /v1/videos",
    )
    serve.add_argument("--max-video-frames", type=int, help="largest frames of a video request")
    serve.add_argument(
        "--max-video-pixels", type=int, help="largest width x height of a video request"
    )
    serve.add_argument("--max-video-steps", type=int, help="largest sampling steps of a video")
    serve.add_argument(
        "--video-threads", type=int, help="torch threads of the video worker (default: cores/2)"
    )
    serve.add_argument(
        "--threads",
        type=int,
        help="torch threads of the text engine (default: $OMP_NUM_THREADS, else cores - 1)",
    )
    serve.add_argument(
        "--engine-in-process",
        action="store_true",
        help="run the text engine as a thread of the server, not in a process of its own",
    )
    serve.set_defaults(
        **{f.name: f.default for f in fields(ServerConfig) if f.default is not MISSING}
    )
    serve.set_defaults(lora=None)  # append to a fresh list, not to the tuple default


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if args.command == "train":
            return _train(args, rest)
        if args.command == "bench":
            return _bench(args, rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "plan":
            return _plan(args)
        if args.command == "merge":
            return _merge(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "ui":
            return _ui(args)
        if args.command == "video":
            return _video_generate(args)
        return _generate(args)
    except UserError as e:
        print(f"parallm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("parallm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
