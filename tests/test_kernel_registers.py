"""benchmarks/kernel_registers.py: a kernel lowered for an H100 on the CPU, compiled by the
`triton` package, and ptxas's register count read back. Run as its own process: it patches
jax's Triton lowering while it lowers, and lowers for CUDA, state this test process keeps out of."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_decode_kernel_registers_on_the_cpu():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_registers.py"), "--kernels",
         "decode", "--head-dim", "64", "--pool-gib", "0.01", "--block-n", "32", "--write", "0,1"],
        capture_output=True, text=True, timeout=600, check=True,
        env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("decode")]
    assert [row[4] for row in rows] == ["0", "1"]  # without and with the KV write inside
    for row in rows:
        warps, stages, regs, spills, per_sm = (int(x) for x in row[6:11])
        assert (warps, stages) == (4, 2)  # the decode kernel's launch, read from the lowering
        assert 16 <= regs <= 255 and spills >= 0
        assert per_sm == 65536 // (-(-regs // 8) * 8 * 32 * warps)
