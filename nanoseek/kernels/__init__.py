"""Small C kernels nanoseek builds on first use, exposed as torch ops.

`q8.c`: int8 weight-only matmuls for CPU decoding (`nanoseek.model.quant`). It needs an x86
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

SOURCE = Path(__file__).with_name("q8.c")


class KernelError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek")


@cache
def q8_library() -> ctypes.CDLL:
    """The compiled q8.c (built on first use; KernelError with the reason when it cannot be)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise KernelError("int8 decoding needs an x86 CPU with AVX2")
    src = SOURCE.read_bytes()
    lib = cache_dir() / f"q8-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not lib.exists():
        cc = shutil.which(os.environ.get("CC", "cc"))
        if cc is None:
            raise KernelError("int8 decoding builds a small C kernel: install a C compiler (cc)")
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=lib.parent, suffix=".so", delete=False) as tmp:
            cmd = [cc, "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", str(SOURCE), "-o", tmp.name]
            r = subprocess.run(cmd + ["-lm"], capture_output=True, text=True)
            if r.returncode != 0:
                os.unlink(tmp.name)
                raise KernelError(f"building {SOURCE.name} failed: {r.stderr.strip()[:500]}")
            os.replace(tmp.name, lib)  # atomic: a concurrent build never loads half a file
    so = ctypes.CDLL(str(lib))
    p, i = ctypes.c_void_p, ctypes.c_int
    so.gemm_q8.argtypes = [p, i, i, p, p, i, p]
    so.moe_q8.argtypes = [p, i, i, p, p, i, i, p, p, p, p, p, p]
    return so


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    if x.dtype != torch.float32 or q.dtype != torch.int8 or scale.dtype != torch.float32:
        raise TypeError(
            f"the int8 kernels take fp32 x, int8 weights, fp32 scales; got {x.dtype}, {q.dtype}"
        )
    if x.device.type != "cpu" or q.shape[1] % 8:
        raise ValueError("the int8 kernels run on the CPU, for rows a multiple of 8 wide")


@torch.library.custom_op("nanoseek::gemm_q8", mutates_args=())
def gemm_q8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32, q [N, K] int8, scale [N] fp32 -> x @ (q * scale[:, None]).T [M, N]."""
    _check(x, q, scale)
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    (M, K), N = x.shape, q.shape[0]
    y = x.new_empty(M, N)
    q8_library().gemm_q8(_ptr(x), M, K, _ptr(q), _ptr(scale), N, _ptr(y))
    return y


@gemm_q8.register_fake
def _(x, q, scale):
    return x.new_empty(x.shape[0], q.shape[0])


@torch.library.custom_op("nanoseek::moe_q8", mutates_args=())
def moe_q8(
    x: torch.Tensor,
    weights: torch.Tensor,
    idx: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
) -> torch.Tensor:
    """Routed experts for few tokens: x [T, d], each token's k experts idx [T, k] with
    routing weights [T, k]; w13 [E * 2I, d] int8 (per expert w1 rows then w3 rows), w2
    [E * d, I] int8, s13 / s2 their row scales -> sum_j weights * W2 (silu(W1 x) * W3 x)."""
    _check(x, w13, s13)
    x, idx = x.contiguous(), idx.contiguous().long()
    weights = weights.contiguous().float()
    (T, d), k, I = x.shape, idx.shape[1], w2.shape[1]
    out, h = x.new_empty(T, d), x.new_empty(3 * I)
    q8_library().moe_q8(
        _ptr(x), T, k, _ptr(idx), _ptr(weights), d, I,
        _ptr(w13), _ptr(s13), _ptr(w2), _ptr(s2), _ptr(out), _ptr(h),
    )  # fmt: skip
    return out


@moe_q8.register_fake
def _(x, weights, idx, w13, s13, w2, s2):
    return torch.empty_like(x)
