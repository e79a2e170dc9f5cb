"""benchmarks/kernel_registers.py: a kernel lowered for an H100 on the CPU, compiled by the
`triton` package, and ptxas's register count read back."""

import importlib
import os
import sys

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import kernel_registers  # noqa: E402


def test_decode_kernel_registers_on_the_cpu():
    decode = importlib.import_module("pallas_kernels.paged_decode_attention")
    interpret_rule = decode._use_interpret
    fn, abstract = kernel_registers.kernel_call("decode", 64, 0.01, 32, write=True, rope=True,
                                                batch=8)
    captured = []
    with kernel_registers.lowering_for_h100(captured):
        jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cuda",))
    assert decode._use_interpret is interpret_rule, "the patches must be undone"
    (launch,) = captured
    assert (launch["num_warps"], launch["num_stages"]) == (4, 2)  # the decode kernel's launch
    assert "tt.func" in launch["ir"] and "tt.dot" in launch["ir"]
    usage = kernel_registers.ptxas_usage(launch["ir"], launch["num_warps"], launch["num_stages"])
    regs = usage["registers"]
    assert 16 <= regs <= 255
    assert usage["spill_store_bytes"] is not None
    assert usage["programs_per_sm_by_registers"] == 65536 // (-(-regs // 8) * 8 * 32 * 4)
