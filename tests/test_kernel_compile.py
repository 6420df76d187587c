"""The Triton kernels compile for real GPUs (A100: sm_80, H100: sm_90) down to a cubin, on this CPU-only machine.

The interpreter (``TRITON_INTERPRET=1``, tests/test_kernels.py) checks the numbers but not what only the compiler
sees: types, pointer casts, control flow on scalars, atomics. Triton can compile ahead of time for a named target
without a device (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, with the ``ptxas``
bundled in its wheel). Runs in a subprocess, because conftest turns the interpreter on for this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import itertools, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from spread_optim.kernels import element as E, group as G

    TYPES = dict(pointers="*i64", numels="*i64", meta="*i64", block_tensor="*i32", block_start="*i64", hyper="*fp32",
                 firsts="*i32", scratch="*fp32", num_groups="i64", scale_ptr="*fp32", found_ptr="*fp32")

    def build(fn, consts, arch):
        sig = {n: "constexpr" if n in consts else TYPES.get(n, "fp32") for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32))
        assert kernel.asm["cubin"], fn.fn.__name__

    rules = [dict(RULE=1, AMSGRAD=False, HAS_MOMENTUM=False, NESTEROV=False),
             dict(RULE=1, AMSGRAD=True, HAS_MOMENTUM=False, NESTEROV=False),
             dict(RULE=0, AMSGRAD=False, HAS_MOMENTUM=True, NESTEROV=True),
             dict(RULE=0, AMSGRAD=False, HAS_MOMENTUM=False, NESTEROV=False)]
    dtypes = [tl.float32, tl.bfloat16, tl.float16]
    count = 0
    for arch in (80, 90):
        for rule, dtype, scaler in zip(rules, itertools.cycle(dtypes), itertools.cycle([True, False])):
            grad = dict(MAXIMIZE=scaler, HAS_SCALE=scaler, G_DTYPE=dtype)
            base = dict(HAS_FOUND=scaler, F_DTYPE=tl.float32, BLOCK=1024)
            balanced = dict(BALANCED=scaler)
            build(E._element_step_kernel, {**rule, **grad, **base, **balanced, "P_DTYPE": dtype}, arch)
            build(G._reduce_kernel, {**grad, **base, "P_DTYPE": dtype}, arch)
            build(G._u_update_kernel, {**rule, **base, **balanced}, arch)
            build(G._w_update_kernel, {**rule, **grad, **base, "P_DTYPE": dtype}, arch)
            build(G._decide_kernel, base, arch)
            build(G._finish_kernel, {**grad, **base, "P_DTYPE": dtype}, arch)
            count += 6
    print("compiled", count)
''')


def test_kernels_compile_for_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, stated (silences its deprecation warning)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled 48" in proc.stdout
