"""What both kernel modules share. Executed by kernels/_triton_loader.py in their mode (GPU compiler
or interpreter), like the kernel modules themselves, so these helpers are built in that mode too.

Reductions and zeros go through builtins only. tl.max, tl.sum and tl.zeros are @triton.jit library
functions, built once in the mode triton was imported in, while the kernels may be built in the other
mode; a library function of the wrong mode cannot be called. So: tl.reduce (a builtin) with the
combine functions below. Under the interpreter, triton's own combine functions let tl.reduce run as
one numpy call.
"""

import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)

# Device helpers (inlined into the kernels when compiled). The interpreter re-patches all of
# triton.language on every call of a jitted helper, which slowed the tests a lot; run as
# plain Python inside an interpreted kernel, where the language is already patched, they
# behave identically.
helper = (lambda fn: fn) if INTERPRET else triton.jit

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): converts natural-log scores to base 2

if INTERPRET:
    max_combine = tl.standard._elementwise_max
    sum_combine = tl.standard._sum_combine
else:
    @triton.jit
    def max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def sum_combine(a, b):
        return a + b
