"""Ahead-of-time compilation of every Triton kernel variant to NVIDIA cubins, without a GPU.

The interpreter runs the kernels' Python semantics; this checks that the real compiler (TTIR -> PTX -> ptxas)
accepts them for Ampere and Hopper, so a GPU session does not discover compile errors first. The compilation
runs in a subprocess without ``TRITON_INTERPRET`` (under the interpreter the kernels are not JIT functions).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

DTYPES = ("fp32", "fp16", "bf16")
NO_TOOLCHAIN = 77


def _variants():
    """(kernel, signature, constexprs, arch, num_warps) for every specialisation the launchers can produce."""
    from triton_kernels import gather_scatter as gs
    from triton_kernels import sampling as sp

    for dtype in DTYPES:
        sig = {"x_ptr": f"*{dtype}", "idx_ptr": "*i64", "out_ptr": f"*{dtype}", "n_rows": "i32", "K": "i32"}
        sig |= {"H": "i32", "sxb": "i64", "sxs": "i32", "sxh": "i32"}
        for arch in (80, 90):
            yield gs._gather_kernel, sig, {"BLOCK_R": 32, "BLOCK_H": 256}, arch, 8
        sig = {"a_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "inv_ptr": "*i32", "out_ptr": f"*{dtype}"}
        sig |= {name: "i32" for name in ("n_rows", "S", "H", "sab", "sas", "sah", "syb", "sys", "syh")}
        for has_a, has_y in [(True, True), (False, True), (True, False)]:
            yield gs._merge_kernel, sig, {"HAS_A": has_a, "HAS_Y": has_y, "BLOCK_R": 8, "BLOCK_H": 1024}, 90, 8
    sig = {"bits_ptr": "*i64", "keep_ptr": "*i8", "out_ptr": "*i64", "S": "i32", "K": "i32", "SHIFT": "i32"}
    for one_chunk, block in [(True, 2048), (False, 4096)]:
        for has_keep in (True, False):
            yield sp._select_kernel, sig, {"HAS_KEEP": has_keep, "ONE_CHUNK": one_chunk, "BLOCK": block}, 90, 8


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for fn, sig, const, arch, warps in _variants():
        src = ASTSource(fn, dict(sig) | {k: "constexpr" for k in const}, const)
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        except FileNotFoundError as err:  # this triton build ships no ptxas
            print(f"no NVIDIA toolchain: {err}")
            return NO_TOOLCHAIN
        assert kernel.asm.get("cubin"), f"{fn.__name__} {const}: no cubin"
        assert ".local" not in kernel.asm["ptx"], f"{fn.__name__} {const}: uses local memory"
        print(f"ok sm_{arch} {fn.__name__} {const}")
    return 0


@pytest.mark.slow
def test_all_kernels_compile_for_ampere_and_hopper():
    pytest.importorskip("triton")
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == NO_TOOLCHAIN:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("ok sm_") == len(DTYPES) * 5 + 4


if __name__ == "__main__":
    sys.exit(main())
