"""`nanoseek serve`: an OpenAI-compatible HTTP server and chat page over a checkpoint."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from nanoseek.cli.infer_cmds import engine_flags, engine_kwargs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (/v1/chat/completions, ...) and a chat page",
        description="Serve a checkpoint over HTTP: OpenAI's /v1 routes, /metrics, and a chat "
        "page at /. See docs/serve.md.",
    )
    p.add_argument("ckpt", help="checkpoint directory, or a run directory holding ckpt/")
    p.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY on /v1 and /metrics (default: $NANOSEEK_API_KEY)",
    )
    p.add_argument(
        "--model-name", default=None, help="the model id clients send (default: the directory name)"
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="context length to preallocate per sequence (default: the model's, at most 4096)",
    )
    p.add_argument(
        "--max-waiting", type=int, default=64, help="choices queued past the batch; beyond: 429"
    )
    p.add_argument(
        "--thinking",
        choices=["auto", "on", "off"],
        default="auto",
        help="chat replies open in thinking mode (on), non-thinking (off), or as the model "
        "chooses (auto); a request's `thinking` field overrides",
    )
    engine_flags(p)
    p.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the latent cache of prompts that share a prefix with an earlier one (a "
        "system prompt, a chat's earlier turns); default on, off with --speculative and for V4",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N], mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16, fp16")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for the engine (default 1: two threads spin-wait against the server)",
    )
    p.set_defaults(func=cmd_serve)


def _model_name(ckpt: str) -> str:
    path = Path(ckpt).resolve()
    return path.parent.name if path.name == "ckpt" else path.name


def _is_v4(ckpt: str) -> bool:
    from nanoseek.hub import resolve_checkpoint
    from nanoseek.utils import read_json

    config = read_json(resolve_checkpoint(ckpt) / "config.json", "a model config")
    return isinstance(config, dict) and config.get("model_type") == "deepseek_v4"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(infos[0][4])
    except OSError as e:
        raise ValueError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host"
        ) from None


def cmd_serve(args) -> int:
    for flag in ("port", "max_batch", "threads"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_waiting < 0:
        raise ValueError(f"--max-waiting must be >= 0, got {args.max_waiting}")
    try:
        from nanoseek.serve import ServerSettings, serve
    except ImportError as e:
        raise ValueError(
            f"nanoseek serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'"
        ) from None
    _check_port(args.host, args.port)  # before the (slower) checkpoint load
    import torch

    from nanoseek.device import resolve_device, resolve_dtype
    from nanoseek.infer import Engine

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    prefix = args.prefix_cache
    if prefix is None:  # on where the engine has one: not with MTP drafts, not for V4
        prefix = not args.speculative and not _is_v4(args.ckpt)
    kwargs = dict(
        max_batch=args.max_batch,
        max_len=args.max_len,
        track_expert_load=True,  # per-layer expert load on /metrics
        prefix_cache=prefix,
        **engine_kwargs(args),
    )
    engine = Engine.load(
        args.ckpt, device=device, dtype=resolve_dtype(args.dtype, device), **kwargs
    )
    api_key = args.api_key or os.environ.get("NANOSEEK_API_KEY") or None
    if api_key is None and not _is_loopback(args.host):
        print(
            f"warning: serving on {args.host} without an API key: anyone who can reach this "
            "port can use it (--api-key or NANOSEEK_API_KEY)",
            file=sys.stderr,
        )
    settings = ServerSettings(
        model_name=args.model_name or _model_name(args.ckpt),
        api_key=api_key,
        max_waiting=args.max_waiting,
        thinking={"auto": None, "on": True, "off": False}[args.thinking],
    )
    serve(engine, settings, host=args.host, port=args.port)
    return 0
