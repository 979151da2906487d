"""Small C++ kernels nanoseek builds on first use, registered as torch ops.

`decode.cpp`: the matmuls of CPU decoding, for fp32 weights and int8 weight-only ones
(`nanoseek.model.quant`): a few activation rows against weights read once, split over
torch's threads; ops nanoseek::gemm_f32, gemm_q8, moe_f32 and moe_q8.
`experts.cpp`: the experts' training step on CPU, fp32 or bf16 (`moe._FusedExpertLoop`):
the per-expert matmuls with the SwiGLU and gate weight fused between them, the rows sorted,
gathered and summed back, the shared experts run as experts; ops nanoseek::experts_dispatch,
experts_fwd, experts_bwd, topk_rows (the gate's top-k) and gate_bwd (its backward from the chosen
scores).
`loss.cpp`: the cross-entropy's softmax on a chunk of logits, in place (`model/loss.py`);
op nanoseek::softmax_xent_.
`optim.cpp`: AdamW with bf16 moments for fp32 parameters (`train.adamw.BF16AdamW`), one
pass a tensor; op nanoseek::adamw_bf16_.
The training kernels (experts, loss, optim) are written with ATen's `at::vec`, so they are
built for the widest vectors torch itself uses here (AVX-512 or AVX2).

Each needs an x86 CPU with AVX2 and a C++ compiler (`c++`, or $CXX); a library is built
against the installed torch once per source and torch version into ~/.cache/nanoseek (or
$NANOSEEK_CACHE) and loaded with `torch.ops.load_library`, which registers its ops: called
from C++, they cost no Python, eagerly or from a compiled decode step's C++ wrapper.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import torch

FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w"]
_LIB = torch.library.Library("nanoseek", "FRAGMENT")  # holds the fake registrations


class KernelError(RuntimeError):
    pass


def cpu_supported() -> bool:
    """Whether this CPU runs the kernels (x86 with AVX2): without it nothing can be installed."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def cache_dir() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE") or Path.home() / ".cache" / "nanoseek")


@cache
def decode_library() -> Path:
    """Build (on first use) and load decode.cpp: its path. KernelError with the reason when
    it cannot be: no AVX2, no compiler, a cache directory it cannot write, a library it
    cannot load."""
    return _load("decode", probe="gemm_f32", fakes=_register_decode_fakes)


@cache
def experts_library() -> Path:
    """Build (on first use) and load experts.cpp: its path, or KernelError as decode_library.
    (Its ops run eagerly only: `Experts.sorted` is not traced by torch.compile.)"""
    return _load("experts", probe="experts_fwd", flags=_vec_flags())


@cache
def loss_library() -> Path:
    """Build (on first use) and load loss.cpp: its path, or KernelError as decode_library."""
    return _load("loss", probe="softmax_xent_", flags=_vec_flags(), fakes=_register_loss_fakes)


@cache
def optim_library() -> Path:
    """Build (on first use) and load optim.cpp: its path, or KernelError as decode_library."""
    return _load("optim", probe="adamw_bf16_", flags=_vec_flags())


def _vec_flags() -> list[str]:
    """Flags that select `at::vec`'s implementation: AVX-512 where torch dispatches to it."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        return [*isa, "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]


def _load(
    name: str, probe: str, flags: Sequence[str] = (), fakes: Callable[[], None] | None = None
) -> Path:
    if not cpu_supported():
        raise KernelError(f"nanoseek's {name} kernels need an x86 CPU with AVX2")
    source = Path(__file__).with_name(f"{name}.cpp")
    flags = [*FLAGS, *flags]
    key = source.read_bytes() + " ".join([torch.__version__, *flags]).encode()
    lib = cache_dir() / f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.so"
    try:
        if not lib.exists():
            _build(source, lib, flags)
        if not hasattr(torch.ops.nanoseek, probe):  # once per process, across cache_clear
            torch.ops.load_library(str(lib))
            if fakes is not None:
                fakes()
    except OSError as e:
        raise KernelError(f"the {name} kernels could not be built or loaded ({lib}): {e}") from e
    return lib


def _build(source: Path, lib: Path, flags: list[str]) -> None:
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        raise KernelError(
            f"the {source.stem} kernels are C++, built on first use: install a C++ compiler (c++)"
        )
    from torch.utils import cpp_extension  # its imports take ~1 s: only when building

    print(f"nanoseek: building {source.name} into {lib.parent} (once, ~20 s)", file=sys.stderr)
    lib.parent.mkdir(parents=True, exist_ok=True)
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch.compiled_with_cxx11_abi())
    with tempfile.NamedTemporaryFile(dir=lib.parent, suffix=".so", delete=False) as tmp:
        cmd = [cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
        cmd += [str(source), "-o", tmp.name, f"-L{torch_lib}", "-lc10", "-ltorch_cpu"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp.name)
            raise KernelError(f"building {source.name} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp.name, lib)  # atomic: a concurrent build never loads half a file


def _register_decode_fakes() -> None:
    """Shapes for torch.compile, which traces the ops without running them."""
    for name, fake in (
        ("gemm_f32", lambda x, w: x.new_empty(x.shape[0], w.shape[0])),
        ("gemm_q8", lambda x, q, scale: x.new_empty(x.shape[0], q.shape[0])),
        ("moe_f32", lambda x, *_: torch.empty_like(x)),
        ("moe_q8", lambda x, *_: torch.empty_like(x)),
    ):
        torch.library.register_fake(f"nanoseek::{name}", fake, lib=_LIB)


def _register_loss_fakes() -> None:
    torch.library.register_fake(
        "nanoseek::softmax_xent_",
        lambda logits, targets: logits.new_empty(logits.shape[0], dtype=torch.float32),
        lib=_LIB,
    )


def builds(library: Callable[[], Path], instead: str) -> bool:
    """Whether a training kernel `library` (experts_library, loss_library) builds and loads
    here. Where it does not, a warning says why and what runs `instead`, unless it is the CPU
    (no AVX2: nothing to install, so nothing to say)."""
    if not cpu_supported():
        return False
    try:
        library()
        return True
    except KernelError as e:
        warnings.warn(f"{e}; {instead}", stacklevel=4)
        return False


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
