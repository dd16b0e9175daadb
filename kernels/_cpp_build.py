"""Build, cache and load one of our C++ CPU kernels (csrc/*.cpp) on first use.

Each source is compiled with the C++ compiler in $CXX (default c++) and -march=native into
$SMALL_LLM_CACHE (default ~/.cache/small-llm)/kernels, under a name keyed by the source, the headers
beside it, the build commands, the torch version and what -march=native targets here (native_target:
the CPU and instruction sets the compiler enables), so a changed kernel, a new torch or another CPU
sharing the home folder never loads a library built for something else. The library registers its operators under
torch.ops.small_llm; the caller gives their fake (shape-only) implementations, which let
torch.compile trace through them and keep each as one call.

`load_once` never raises for a missing compiler or a failed build: it returns the one-line reason,
and the caller falls back to its PyTorch path.

Why not torch.utils.cpp_extension.load (torch 2.13): it needs ninja, which nothing else here does;
its build folder is named after the extension alone (the source/flag hash only numbers versions
within one process), so another CPU sharing the folder would get this one's library all the same;
and its lock file outlives a build that was killed, after which every load waits forever
(pytorch/pytorch#189245). Two compiler calls, a hashed name and an atomic rename avoid all three.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

_lock = threading.Lock()  # one build at a time in a process; the atomic rename covers processes


def _cache_dir() -> Path:
    root = os.environ.get("SMALL_LLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "small-llm"
    return Path(root) / "kernels"


def _build_commands(source: Path, obj: Path, lib: Path) -> list[list[str]]:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple clang has no OpenMP: one thread
    # -ffast-math when compiling only: it lets reductions and exp loops vectorise (the kernels never
    # rely on inf or NaN), and is kept off the link line, where GCC would add a start-up file that
    # flushes denormals for the whole process.
    compile_ = [cxx, "-O3", "-march=native", "-ffast-math", "-fPIC", "-std=c++17", "-w", *openmp,
                f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *includes,
                "-c", str(source), "-o", str(obj)]
    libdir = cpp_extension.library_paths()[0]
    link = [cxx, "-shared", *openmp, str(obj), "-o", str(lib), f"-L{libdir}", "-ltorch_cpu", "-lc10",
            f"-Wl,-rpath,{libdir}"]
    return [compile_, link]


def _run(cmd: list[str], stdin: str | None = None) -> str:
    """Run a compiler command: its stdout, or RuntimeError with a one-line reason."""
    try:
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(f"no C++ compiler '{cmd[0]}' (install g++ or clang, or set CXX)") from None
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"'{cmd[0]}' failed: {' | '.join(tail)}")
    return done.stdout


@functools.cache
def native_target(cxx: str) -> str:
    """What -march=native compiles for on this machine, as the compiler sees it: the macros it predefines
    with that flag name the CPU (__znver3__, __skylake__, ...) and each instruction set it enables
    (__AVX2__, __AVX512F__, __AVX512VNNI__, ...), plus the compiler's version. A library built for one
    answer may crash (SIGILL) on a CPU with another, so the cache key holds it (GCC and Clang alike)."""
    macros = _run([cxx, "-march=native", "-E", "-dM", "-x", "c++", "-"], stdin="")
    return "\n".join(sorted(macros.splitlines()))  # sorted: their order is not part of the target


def _library_path(source: Path) -> Path:
    cmds = _build_commands(source, Path("kernel.o"), Path("kernel.so"))
    key = hashlib.sha256()
    key.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # the loops the sources share (linear.h, attention.h)
        key.update(header.read_bytes())
    key.update(repr(cmds).encode())
    key.update(f"{torch.__version__} {platform.machine()}\n{native_target(cmds[0][0])}".encode())
    return _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _build(source: Path, lib: Path, what: str) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    print(f"building {what} into {lib.parent} (once, about 15 s)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        tmp_lib = Path(tmp) / lib.name
        for cmd in _build_commands(source, Path(tmp) / "kernel.o", tmp_lib):
            _run(cmd)
        os.replace(tmp_lib, lib)  # atomic: a concurrent build or a crash never leaves half a library


def load_once(state: dict, source: Path, what: str, fakes: dict[str, Callable]) -> str | None:
    """Build `source` (if not cached on disk) and load it, once per `state` dict (the caller's
    module-level memo); register the fake implementation of each operator named in `fakes`.
    Returns the reason the kernel is unavailable, or None. `what` names it in the build message."""
    with _lock:
        if "error" not in state:
            try:
                lib = _library_path(source)
                if not lib.exists():
                    _build(source, lib, what)
                torch.ops.load_library(str(lib))
                for op, fake in fakes.items():
                    torch.library.register_fake(op)(fake)
                state["error"] = None
            except (RuntimeError, OSError) as e:
                state["error"] = str(e)
        return state["error"]
