"""Paged decode attention on CPU: a C++ kernel (csrc/paged_attention_cpu.cpp) built on first use.

    o = paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, sm_scale,
                                   v_dim=None, k_last=None, v_last=None)

The contract of kernels/paged_attention.py (float32 here), plus k_last/v_last [B, Hkv, D]: the K/V
of each sequence's last position (context_len - 1), read from there instead of the cache, so a
decode step can attend before it writes the new token (the engine writes every layer's at once).
It reads the pages in place, where the PyTorch gather path copies every sequence's context first.

The kernel is compiled once per source, flags, torch version and CPU kind with the C++ compiler in
$CXX (default c++), about 15 s, into $SMALL_LLM_CACHE (default ~/.cache/small-llm) and loaded as the
operator torch.ops.small_llm.paged_decode_attention, which torch.compile keeps as one call.
`cpu_kernel_error()` says why it is unavailable (no compiler, build failure), or None.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from .paged_attention import _validate

SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"
_lock = threading.Lock()
_state: dict = {}  # "error": None once loaded, else the reason it could not be


def _cache_dir() -> Path:
    root = os.environ.get("SMALL_LLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "small-llm"
    return Path(root) / "kernels"


def _build_commands(obj: Path, lib: Path) -> list[list[str]]:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no OpenMP: one thread
    # -ffast-math when compiling only: it lets the exp loop vectorise (the kernel never relies on inf
    # or NaN), and is kept off the link line, where GCC would add a start-up file that flushes
    # denormals for the whole process.
    compile_ = [cxx, "-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c++17", "-w", *openmp,
                f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes,
                "-c", str(SOURCE), "-o", str(obj)]
    libdir = cpp_extension.library_paths()[0]
    link = [cxx, "-shared", *openmp, str(obj), "-o", str(lib), f"-L{libdir}", "-ltorch_cpu", "-lc10",
            f"-Wl,-rpath,{libdir}"]
    return [compile_, link]


def _library_path() -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(repr(_build_commands(Path("kernel.o"), Path("kernel.so"))).encode())
    key.update(f"{torch.__version__} {platform.machine()} {torch.backends.cpu.get_cpu_capability()}".encode())
    return _cache_dir() / f"paged_attention_cpu-{key.hexdigest()[:16]}.so"


def _build(lib: Path) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the CPU paged-attention kernel into {lib.parent} (once, about 15 s)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        tmp_lib = Path(tmp) / lib.name
        for cmd in _build_commands(Path(tmp) / "kernel.o", tmp_lib):
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
            except FileNotFoundError:
                raise RuntimeError(f"no C++ compiler '{cmd[0]}' (install g++ or clang, or set CXX)") from None
            if done.returncode:
                tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                raise RuntimeError(f"'{cmd[0]}' failed: {' | '.join(tail)}")
        os.replace(tmp_lib, lib)  # atomic: a concurrent build or a crash never leaves half a library


def cpu_kernel_error() -> str | None:
    """Build (once per process, if not cached on disk) and load the kernel; the reason it is not
    available, or None."""
    with _lock:
        if "error" not in _state:
            try:
                lib = _library_path()
                if not lib.exists():
                    _build(lib)
                torch.ops.load_library(str(lib))
                torch.library.register_fake("small_llm::paged_decode_attention")(_fake)
                _state["error"] = None
            except (RuntimeError, OSError) as e:
                _state["error"] = str(e)
        return _state["error"]


def _fake(q, k_cache, v_cache, block_tables, context_lens, k_last, v_last, scale, v_dim):
    """Output shape for torch.compile's tracing."""
    return q.new_empty(q.shape[0], q.shape[1], v_dim)


def paged_attention_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, sm_scale=None, v_dim=None,
                               k_last=None, v_last=None):
    """The C++ kernel; the contract of `paged_attention_decode_torch` (float32), plus k_last/v_last."""
    Dv, sm_scale = _validate(q, k_cache, v_cache, block_tables, context_lens, sm_scale, v_dim, False)
    if q.device.type != "cpu" or q.dtype != torch.float32:
        raise ValueError(f"paged_attention_decode_cpu: float32 CPU tensors only, got {q.dtype} on {q.device}; "
                         "use paged_attention_decode_torch")
    B, _, Dqk = q.shape
    Hkv = k_cache.shape[2]
    for name, t, d in (("k_last", k_last, Dqk), ("v_last", v_last, Dv)):
        if t is not None and (tuple(t.shape) != (B, Hkv, d) or t.dtype != q.dtype):
            raise ValueError(f"paged_attention_decode_cpu: {name} must be float32 [{B}, {Hkv}, {d}], "
                             f"got {t.dtype} {tuple(t.shape)}")
    if (v_last is not None) != (k_last is not None and v_cache is not None):
        raise ValueError("paged_attention_decode_cpu: pass v_last exactly when k_last and v_cache are given")
    error = cpu_kernel_error()
    if error:
        raise RuntimeError(f"paged_attention_decode_cpu: the kernel is unavailable: {error}")
    return torch.ops.small_llm.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, k_last,
                                                      v_last, sm_scale, Dv)
