"""Which device to run on: one check shared by training, the engine and the server."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that is not available here; the message lists the ones that are."""


def available_devices() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> the first GPU if there is one, else the CPU; anything else must exist here."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every backend it knows, not what is here
        device = None
    ok = device is not None and (
        device.type == "cpu"
        or (device.type == "cuda" and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and torch.backends.mps.is_available())
    )
    if not ok:
        raise DeviceError(
            f"device {str(name)!r} is not available here; available: auto, "
            + ", ".join(available_devices())
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on GPUs that have it and on CPUs with native bf16 matmul (AMX /
    AVX512-BF16), else fp32. (oneDNN takes bf16 on any AVX-512 CPU, emulated where neither
    is there: on such a Xeon one-thread bf16 products ran at 0.46x fp32's, `small`'s
    training step at 0.33x.)"""
    named = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name in named:
        return named[name]
    if name != "auto":
        raise DeviceError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX512-BF16 instructions, as the OS exposes them (a VM may hide AMX).
    A torch without these private probes falls back to oneDNN's own answer."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if amx is None or avx512_bf16 is None:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return amx() or avx512_bf16()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_KEEP_BELOW = 1 << 30  # allocations up to 1 GiB come from (and return to) the heap


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of returning it to the
    kernel. By default every allocation over 128 KB-32 MB is a fresh mmap and a freed heap
    top is trimmed, so each training step's gradients, autocast copies and logits chunks
    arrive as new pages: up to ~40K page faults a step for `small`, how many depending on
    what the process ran before (up to a quarter of a bf16 step on 2 cores). With this the
    process keeps its peak step's memory and reuses it.
    Returns False where it does not apply (not Linux glibc) or NANOSEEK_KEEP_FREED_MEMORY=0
    turns it off. Idempotent."""
    import ctypes
    import ctypes.util
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("NANOSEEK_KEEP_FREED_MEMORY") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW) and mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))


TCMALLOC_OFF = "NANOSEEK_TCMALLOC"  # =0: keep glibc's malloc


def preload_tcmalloc() -> None:
    """Restart this process (the same command, by exec) with Google's tcmalloc preloaded, where
    it is installed (Debian / Ubuntu: libtcmalloc-minimal4) and not loaded yet. Training on CPU
    allocates and frees the same large tensors every step; tcmalloc reuses them where glibc's
    memalign (2.36) hands out fresh pages: one-thread bf16 steps of `small` 1.14-1.17x faster,
    `dense-small` 1.0-1.08x, fp32 unchanged, losses bit-identical (README, "A faster
    allocator"). Does nothing off Linux, without the library, or with NANOSEEK_TCMALLOC=0.
    Call it only from a process's entry point, before any output: it does not return when it
    restarts."""
    import ctypes.util
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get(TCMALLOC_OFF) == "0":
        return
    preloaded = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preloaded:  # loaded, or tried and refused by ld.so: never loop
        return
    lib = ctypes.util.find_library("tcmalloc_minimal")
    if lib is None or not sys.executable:
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib} {preloaded}".strip())
    # tcmalloc reports every allocation over 1 GiB on stderr: a big model's are expected
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot restart (a sandbox, an odd interpreter): go on with glibc
        return


def tcmalloc_loaded() -> bool:
    """Whether this process runs on tcmalloc (preload_tcmalloc, or the user's LD_PRELOAD)."""
    try:
        with open("/proc/self/maps") as maps:
            return "libtcmalloc" in maps.read()
    except OSError:
        return False


def allocator_note(device: torch.device) -> str:
    """' (tcmalloc)' for a run's opening line when it trains on the CPU on tcmalloc, else ''."""
    return " (tcmalloc)" if device.type == "cpu" and tcmalloc_loaded() else ""
