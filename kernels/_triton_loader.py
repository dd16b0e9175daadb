"""Load a Triton kernel module for the GPU compiler or for Triton's CPU interpreter.

`@triton.jit` decides at *decoration* time whether a kernel is compiled for the GPU or run by
the interpreter (`TRITON_INTERPRET=1`). If the kernels lived in a normally-imported module, the
mode would be frozen by whoever imported them first, e.g. a model module imported before a test
sets the variable. Instead the wrappers read the mode at *call* time and ask this loader for a
copy of the kernel module built in that mode. Each copy has its own globals, so the helpers a
kernel calls are built in the same mode as the kernel itself. (Triton's own library functions
such as tl.max are built once, in the mode triton was imported in, so the kernel modules use
builtins only; see _triton_common.py.)

So one file may be executed twice, once per mode. A GPU process only ever loads the compiled copy;
both live side by side in the tests, which run the kernels in the interpreter and also compile them
for a GPU ahead of time (test_kernels_compile_for_gpu), in one process.

Nothing here touches `triton.runtime.driver.active`, so importing works on CPU-only machines.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

import triton

_modules: dict[tuple[str, bool], ModuleType] = {}
_lock = threading.RLock()  # re-entrant: a kernel module loads _triton_common while executing


def interpreting() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET=1), read now, not at import."""
    return bool(triton.knobs.runtime.interpret)


def load_kernel_module(name: str, interpret: bool) -> ModuleType:
    """Return `kernels/<name>.py` executed with the interpreter switched on or off."""
    key = (name, interpret)
    if key in _modules:
        return _modules[key]
    with _lock:
        if key in _modules:
            return _modules[key]
        path = Path(__file__).with_name(f"{name}.py")
        mod_name = f"{__package__}.{name}__{'interpreter' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # inspect.getsource (used by both modes) wants this
        # Triton's own scope restores the switch (and TRITON_INTERPRET, which setting it writes) on exit.
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret  # what @triton.jit reads while the module executes
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(mod_name, None)
                raise
        _modules[key] = module
        return module
