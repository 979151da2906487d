"""Small C kernels nanoseek builds on first use, exposed as torch ops.

`decode.c`: the matmuls of CPU decoding, for fp32 weights and int8 weight-only ones
(`nanoseek.model.quant`): a few activation rows against weights read once. It needs an x86
CPU with AVX2 and a C compiler (`cc`, or $CC); the library is built once per source
version into ~/.cache/nanoseek (or $NANOSEEK_CACHE) and loaded with ctypes. The ops are
registered with torch.library, so a compiled decode step calls them like any other op.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode.c")


class KernelError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek")


@cache
def decode_library() -> ctypes.CDLL:
    """The compiled decode.c (built on first use; KernelError with the reason when it cannot
    be: no AVX2, no compiler, a cache directory it cannot write, a library it cannot load)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise KernelError("nanoseek's decode kernels need an x86 CPU with AVX2")
    src = SOURCE.read_bytes()
    lib = cache_dir() / f"decode-{hashlib.sha256(src).hexdigest()[:16]}.so"
    try:
        if not lib.exists():
            _build(lib)
        so = ctypes.CDLL(str(lib))
    except OSError as e:
        raise KernelError(f"the decode kernels could not be built or loaded ({lib}): {e}") from e
    p, i = ctypes.c_void_p, ctypes.c_int
    for kind in ("f32", "q8"):
        getattr(so, f"gemm_{kind}").argtypes = [p, i, i, p, p, i, p]
        getattr(so, f"moe_{kind}").argtypes = [p, i, i, p, p, i, i, p, p, p, p, p, p]
    return so


def _build(lib: Path) -> None:
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise KernelError("the decode kernels are C, built on first use: install a C compiler (cc)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=lib.parent, suffix=".so", delete=False) as tmp:
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", str(SOURCE), "-o", tmp.name]
        r = subprocess.run(cmd + ["-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp.name)
            raise KernelError(f"building {SOURCE.name} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp.name, lib)  # atomic: a concurrent build never loads half a file


def unavailable_reason() -> str | None:
    """Why the decode kernels cannot build or load here, or None when they can."""
    try:
        decode_library()
    except KernelError as e:
        return str(e)
    return None


def available() -> bool:
    """Whether the decode kernels build and load here."""
    return unavailable_reason() is None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> None:
    want = torch.float32 if scale is None else torch.int8
    bad_scale = scale is not None and scale.dtype != torch.float32
    if x.dtype != torch.float32 or w.dtype != want or bad_scale:
        raise TypeError(
            "the decode kernels take fp32 x and fp32 weights, or int8 weights with fp32 "
            f"scales; got {x.dtype}, {w.dtype}"
        )
    if x.device.type != "cpu" or w.shape[1] % 8:
        raise ValueError("the decode kernels run on the CPU, for rows a multiple of 8 wide")


def _gemm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    _check(x, w, scale)
    x, w = x.contiguous(), w.contiguous()
    (M, K), N = x.shape, w.shape[0]
    y = x.new_empty(M, N)
    lib = decode_library()
    gemm = lib.gemm_f32 if scale is None else lib.gemm_q8
    gemm(_ptr(x), M, K, _ptr(w), _ptr(scale), N, _ptr(y))
    return y


def _moe(x, weights, idx, w13, s13, w2, s2) -> torch.Tensor:
    _check(x, w13, s13)
    x, idx = x.contiguous(), idx.contiguous().long()
    weights = weights.contiguous().float()
    (T, d), k, I = x.shape, idx.shape[1], w2.shape[1]
    out, h = x.new_empty(T, d), x.new_empty(3 * I)
    lib = decode_library()
    moe = lib.moe_f32 if s13 is None else lib.moe_q8
    moe(
        _ptr(x), T, k, _ptr(idx), _ptr(weights), d, I,
        _ptr(w13), _ptr(s13), _ptr(w2), _ptr(s2), _ptr(out), _ptr(h),
    )  # fmt: skip
    return out


# The ops are defined with torch.library.Library, not torch.library.custom_op: a call
# costs ~15 us instead of ~50, and a decode step of `small` makes ~40 of them.
_LIB = torch.library.Library("nanoseek", "FRAGMENT")


def _op(schema: str, impl, fake) -> None:
    name = schema.split("(")[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CPU")
    torch.library.register_fake(f"nanoseek::{name}", fake, lib=_LIB)


def gemm_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32, w [N, K] fp32 -> x @ w.T [M, N]."""
    return _gemm(x, w, None)


def gemm_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32, q [N, K] int8, scale [N] fp32 -> x @ (q * scale[:, None]).T [M, N]."""
    return _gemm(x, q, scale)


def moe_f32(x, weights, idx, w13, w2) -> torch.Tensor:
    """Routed experts for few tokens: x [T, d], each token's k experts idx [T, k] with
    routing weights [T, k]; w13 [E * 2I, d] fp32 (per expert w1 rows then w3 rows), w2
    [E * d, I] -> sum_j weights * W2 (silu(W1 x) * W3 x)."""
    return _moe(x, weights, idx, w13, None, w2, None)


def moe_q8(x, weights, idx, w13, s13, w2, s2) -> torch.Tensor:
    """moe_f32 with int8 weights w13, w2 and their row scales s13, s2."""
    return _moe(x, weights, idx, w13, s13, w2, s2)


_op(
    "gemm_f32(Tensor x, Tensor w) -> Tensor",
    gemm_f32,
    lambda x, w: x.new_empty(x.shape[0], w.shape[0]),
)
_op(
    "gemm_q8(Tensor x, Tensor q, Tensor scale) -> Tensor",
    gemm_q8,
    lambda x, q, scale: x.new_empty(x.shape[0], q.shape[0]),
)
_op(
    "moe_f32(Tensor x, Tensor weights, Tensor idx, Tensor w13, Tensor w2) -> Tensor",
    moe_f32,
    lambda x, *_: torch.empty_like(x),
)
_op(
    "moe_q8(Tensor x, Tensor weights, Tensor idx, Tensor w13, Tensor s13, Tensor w2, "
    "Tensor s2) -> Tensor",
    moe_q8,
    lambda x, *_: torch.empty_like(x),
)
