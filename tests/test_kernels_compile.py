"""Ahead-of-time compilation of every Triton kernel variant to NVIDIA cubins, without a GPU.

The interpreter runs the kernels' Python semantics; this checks that the real compiler (TTIR -> PTX -> ptxas)
accepts them for Ampere and Hopper, so a GPU session does not discover compile errors first. The compilation
runs in a subprocess without ``TRITON_INTERPRET`` (under the interpreter the kernels are not JIT functions).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

DTYPES = ("fp32", "fp16", "bf16")
NO_TOOLCHAIN = 77


def _variants():
    """(kernel, signature, constexprs, arch, num_warps) for every specialisation the launchers can produce."""
    from lightning_dataeff.kernels import gather_scatter as gs
    from lightning_dataeff.kernels import sampling as sp

    gather_sig = {"idx_ptr": "*i64", "n_rows": "i32", "K": "i32", "H": "i32", "sxb": "i64", "sxs": "i32", "sxh": "i32"}
    merge_sig = {"inv_ptr": "*i32"} | {n: "i32" for n in ("n_rows", "S", "H", "sab", "sas", "sah", "syb", "sys", "syh")}
    for dtype in DTYPES:
        for width in (768,) if dtype != "bf16" else (13, 768, 2048):  # the launcher's tiles for these widths
            block_r, block_h, warps = gs._tiles(1 << 20, width)
            tiles = {"BLOCK_R": block_r, "BLOCK_H": block_h}
            sig = gather_sig | {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
            for arch in (80, 90):
                yield gs._gather_kernel, sig, tiles, arch, warps
            sig = merge_sig | {"a_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
            for has_a, has_y in [(True, True), (False, True), (True, False)]:
                yield gs._merge_kernel, sig, {"HAS_A": has_a, "HAS_Y": has_y} | tiles, 90, warps
    yield gs._inverse_kernel, {"idx_ptr": "*i64", "inv_ptr": "*i32", "S": "i32", "K": "i32"}, {"BLOCK": 2048}, 90, 4
    sig = {"bits_ptr": "*i64", "keep_ptr": "*i8", "out_ptr": "*i64", "S": "i32", "K": "i32", "SHIFT": "i32"}
    for one_chunk, block, warps in [(True, 2048, 4), (True, 4096, 8), (False, 4096, 8)]:
        for has_keep in (True, False):
            yield sp._select_kernel, sig, {"HAS_KEEP": has_keep, "ONE_CHUNK": one_chunk, "BLOCK": block}, 90, warps


def _spilled_bytes(ptx: str, arch: int) -> int | None:
    """Register spill stores reported by ``ptxas -v`` (None when the bundled ptxas cannot be located)."""
    try:  # private API whose signature moved between triton releases; the spill check is best effort
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(arch).path
        except TypeError:
            ptxas = get_ptxas().path
    except Exception:  # noqa: BLE001
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        cmd = [ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    found = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    return sum(map(int, found)) if proc.returncode == 0 and found else None


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
        spilled = _spilled_bytes(kernel.asm["ptx"], arch)
        assert not spilled, f"{fn.__name__} {const}: {spilled} bytes of register spills"
        print(f"ok sm_{arch} {fn.__name__} {const} spills={spilled}")
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
    assert proc.stdout.count("ok sm_") == (len(DTYPES) + 2) * 5 + 7


if __name__ == "__main__":
    sys.exit(main())
