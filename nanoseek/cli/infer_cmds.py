"""`nanoseek sample | generate | chat`: text out of a checkpoint."""

from __future__ import annotations

import argparse
import sys
import time


def engine_flags(p: argparse.ArgumentParser) -> None:
    """How the engine decodes: the flags `generate`, `sample`, `chat` and `serve` share."""
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument(
        "--lookup-drafts",
        type=int,
        default=None,
        metavar="K",
        help="draft K tokens a step from the text itself (what followed the last time the "
        "same two tokens appeared, copied on as a loop; greedy requests; no MTP module "
        "needed; 4 was the best of 1-8 on make run's model, with --compile). Default: 1 "
        "after the MTP draft with --speculative, else 0",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode steps through torch.compile (faster steps at small batches; each new "
        "batch shape compiles first, tens of seconds on a CPU)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: decode with the weights every token reads in int8 (weight-only, x86 "
        "CPU with AVX2, fp32 model): a quarter of the bytes, logits within ~1%%",
    )
    p.add_argument(
        "--kernels",
        choices=["auto", "on", "off"],
        default="auto",
        help="nanoseek's fp32 decode kernel for the one-row matmuls (auto: on a CPU with "
        "AVX2 and a C++ compiler, for models of 16 MB and more); off: MKL",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Engine.load arguments `engine_flags` set."""
    return dict(
        speculative=args.speculative,
        lookup_drafts=args.lookup_drafts,
        compile=args.compile,
        quantize=args.quantize,
        kernels={"auto": None, "on": True, "off": False}[args.kernels],
    )


def _sampling_flags(p: argparse.ArgumentParser, max_tokens: int = 128) -> None:
    p.add_argument(
        "ckpt", help="checkpoint directory (config.json + safetensors [+ tokenizer.json])"
    )
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    engine_flags(p)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: decode matmuls are small, and 2 threads spin-wait "
        "against any other busy process)",
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="context length to preallocate (default: the model's, at most 4096)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream a completion of a prompt to stdout")
    _sampling_flags(p)
    p.add_argument("prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("sample", help="print n independent samples for a prompt")
    _sampling_flags(p, max_tokens=64)
    p.add_argument("prompt")
    p.add_argument("-n", type=int, default=3, help="number of samples (batched)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /exit)")
    _sampling_flags(p, max_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)


def _engine(args, max_batch: int = 1):
    import torch

    from nanoseek.infer import Engine, SamplingParams

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )  # validated before the (slower) checkpoint load
    engine = Engine.load(
        args.ckpt,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        max_batch=max_batch,
        max_len=args.max_len,
        **engine_kwargs(args),
    )
    return engine, params


def _need_tokenizer(engine) -> None:
    if engine.tokenizer is None:
        from nanoseek.infer import EngineError

        raise EngineError(
            "this checkpoint has no tokenizer.json; copy the training tokenizer into it"
        )


def _summary(engine, n_tokens: int, seconds: float) -> str:
    s = f"[{n_tokens} tokens, {n_tokens / max(seconds, 1e-9):.1f} tok/s"
    if engine.drafting:
        s += f", draft acceptance {engine.spec_stats.acceptance:.0%}"
    return s + "]"


def cmd_generate(args) -> int:
    engine, params = _engine(args)
    _need_tokenizer(engine)
    t0 = time.perf_counter()
    for delta in engine.stream(args.prompt, params):
        sys.stdout.write(delta)
        sys.stdout.flush()
    print()
    print(_summary(engine, engine.tokens_generated, time.perf_counter() - t0), file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    engine, params = _engine(args, max_batch=min(args.n, 16))
    _need_tokenizer(engine)
    t0 = time.perf_counter()
    outs = engine.generate([args.prompt] * args.n, params)
    for i, out in enumerate(outs):
        print(f"--- sample {i + 1} ({out.finish_reason})\n{args.prompt}{out.text}")
    n = sum(len(o.token_ids) for o in outs)
    print(_summary(engine, n, time.perf_counter() - t0), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    engine, params = _engine(args)
    _need_tokenizer(engine)
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("nanoseek chat: /reset clears the conversation, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            user = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user in ("/exit", "/quit"):
            return 0
        if user == "/reset":
            messages = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        room = engine.max_len - len(prompt)
        if room < 1:
            print(
                "(the conversation no longer fits the context; /reset to start over)",
                file=sys.stderr,
            )
            messages.pop()
            continue
        params.max_tokens = min(args.max_tokens, room)
        reply = []
        sys.stdout.write("bot> ")
        try:
            for delta in engine.stream(prompt, params):
                reply.append(delta)
                sys.stdout.write(delta)
                sys.stdout.flush()
        except KeyboardInterrupt:  # stop this reply, keep the chat
            sys.stdout.write(" [interrupted]")
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
