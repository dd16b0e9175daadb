"""kernels/_cpp_build.py: a built kernel is cached under what -march=native targets, so two CPUs
sharing a cache folder never load each other's library (one built for the other may hold
instructions this one lacks: SIGILL)."""

from pathlib import Path

import pytest
import torch

from kernels import _cpp_build
from kernels.paged_attention_cpu import SOURCE


def test_the_cache_key_follows_the_native_target(monkeypatch, tmp_path):
    monkeypatch.setenv("SMALL_LLM_CACHE", str(tmp_path))
    target = {"now": "#define __AVX512F__ 1\n#define __znver4__ 1"}
    monkeypatch.setattr(_cpp_build, "native_target", lambda cxx: target["now"])
    ours = _cpp_build._library_path(SOURCE)
    assert _cpp_build._library_path(SOURCE) == ours  # the same target: the same library
    target["now"] = "#define __AVX2__ 1\n#define __haswell__ 1"
    theirs = _cpp_build._library_path(SOURCE)
    assert theirs != ours and theirs.parent == ours.parent


def test_a_library_built_for_another_cpu_is_not_loaded(monkeypatch, tmp_path):
    """A library another CPU built sits in the shared cache: this CPU builds its own and loads that."""
    monkeypatch.setenv("SMALL_LLM_CACHE", str(tmp_path))
    monkeypatch.setattr(_cpp_build, "native_target", lambda cxx: "#define __AVX512F__ 1")
    theirs = _cpp_build._library_path(SOURCE)
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"a library with instructions this CPU lacks")
    monkeypatch.setattr(_cpp_build, "native_target", lambda cxx: "#define __AVX2__ 1")
    built, loaded = [], []
    monkeypatch.setattr(_cpp_build, "_build", lambda source, lib, what: built.append(lib))
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(Path(path)))
    assert _cpp_build.load_once({}, SOURCE, "the test kernel", {}) is None
    assert built == loaded and len(built) == 1 and built[0] != theirs


def test_the_native_target_names_what_the_cpu_has():
    """The probe against the kernel's own list of this CPU's features (/proc/cpuinfo on x86 Linux)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no x86 /proc/cpuinfo to compare with")
    flags = set(flags.split(":", 1)[1].split())
    target = _cpp_build.native_target("c++")
    assert target == _cpp_build.native_target("c++")
    for flag, macro in (("avx2", "__AVX2__"), ("fma", "__FMA__"), ("avx512f", "__AVX512F__"), ("sse4_2", "__SSE4_2__")):
        assert (f"#define {macro} 1" in target) == (flag in flags), flag
