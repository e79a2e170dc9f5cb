"""Registers and spills of the Pallas Triton kernels on an H100 (sm_90a), estimated without a GPU.

A kernel's occupancy on the H100 falls in steps with its registers: at 4 warps a program, 64
registers a thread let 8 programs share an SM, 65-72 only 7, 73-80 only 6. Two measured cases
(benchmarks/NOTES_kernels.md, twelfth session): the head-dim-64 decode kernel over a pool above
4 GiB (64-bit offsets) went from 64 to 65 registers and lost 5% of its speed, and the first
version of the decode kernel that also writes the KV cache took 94 and made a decode step 10%
slower. This script shows such a change on any machine:

1. jax lowers the kernel for CUDA on the CPU, its Triton lowering told the target is an H100
   (jax's own lowering would ask a GPU for it); the Triton IR is kept;
2. the `triton` package (a dependency of the torch wheel) compiles that IR to PTX for sm_90a,
   in a child process (it carries its own LLVM, as jaxlib does; kept apart as a precaution);
3. its bundled `ptxas -v` reports registers and spills.

An estimate, not the number the GPU runs with: XLA compiles the same IR with the Triton and
ptxas it was built with. The one case compared so far read 64 here against 65 in Nsight Compute
(the decode kernel above). Compare variants with each other here, then measure on the GPU.

    python benchmarks/kernel_registers.py                      # the engine's decode shapes
    python benchmarks/kernel_registers.py --kernels decode --head-dim 64 --block-n 32,64 \\
        --pool-gib 0.1,20 --write 0,1
"""

import argparse
import contextlib
import functools
import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KERNEL_MODULES = ("pallas_kernels.paged_decode_attention", "pallas_kernels.kv_cache_write",
                  "pallas_kernels.ragged_paged_attention")


@contextlib.contextmanager
def lowering_for_h100(captured: list):
    """Within: pallas_calls lower for an H100 on any machine, and each one's Triton module (as
    text) and its num_warps / num_stages are appended to `captured`."""
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import gpu_info
    from jax._src.pallas.triton import pallas_call_registration as registration

    saved = [(registration.gpu_info_lib, "get_gpu_info"),
             (registration.lowering, "lower_jaxpr_to_triton_module"),
             (pallas_core, "get_lowering_rule")]
    saved = [(obj, name, getattr(obj, name)) for obj, name in saved]
    modules = [importlib.import_module(m) for m in KERNEL_MODULES]
    saved += [(m, "_use_interpret", m._use_interpret) for m in modules]
    lower_module, get_rule = saved[1][2], saved[2][2]
    params = {}

    def capture_module(*args, **kwargs):
        result = lower_module(*args, **kwargs)
        captured.append(dict(params, ir=result.module.operation.get_asm()))
        return result

    def capture_rule(kind, platform):
        rule = get_rule(kind, platform)

        def wrapped(ctx, *nodes, compiler_params, **kw):
            params.update(num_warps=compiler_params.num_warps or 4,
                          num_stages=compiler_params.num_stages or 3)
            return rule(ctx, *nodes, compiler_params=compiler_params, **kw)
        return wrapped

    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
    registration.gpu_info_lib.get_gpu_info = lambda: h100
    registration.lowering.lower_jaxpr_to_triton_module = capture_module
    pallas_core.get_lowering_rule = capture_rule
    for m in modules:
        m._use_interpret = lambda interpret: False
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# Run in a child process: the triton package carries its own LLVM and jaxlib has another;
# they are kept out of one process as a precaution.
_COMPILE_IN_CHILD = """
import os, sys
import triton
from triton.backends.compiler import GPUTarget
path, num_warps, num_stages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))
with open(path + ".ptx", "w") as f:
    f.write(compiled.asm["ptx"])
print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
"""


def ptxas_usage(ir: str, num_warps: int, num_stages: int) -> dict:
    """Compile Triton IR text for sm_90a with the `triton` package (in a child process); ptxas's
    registers and spills."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir)
        ptxas = subprocess.run([sys.executable, "-c", _COMPILE_IN_CHILD, path, str(num_warps),
                                str(num_stages)], capture_output=True, text=True,
                               check=True).stdout.strip().splitlines()[-1]
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path + ".ptx", "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    used = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(used.group(1)) if used else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None,
            "programs_per_sm_by_registers": (65536 // (_allocated(int(used.group(1))) * 32 * num_warps)
                                             if used else None)}


def _allocated(registers: int) -> int:
    return -(-registers // 8) * 8  # allocated per thread in units of 8


def kernel_call(kernel: str, head_dim: int, pool_gib: float, block_n: int | None, write: bool,
                rope: bool, batch: int = 256, heads: tuple[int, int] = (32, 8), block: int = 16):
    """(function, abstract arguments) of one kernel launch at the engine's decode shape."""
    from pallas_kernels.kv_cache_write import write_kv_cache_tuned
    from pallas_kernels.paged_decode_attention import paged_decode_attention_tuned
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention_tuned

    nq, nkv = heads
    sd = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    pages = max(2, int(pool_gib * 2**30) // (block * nkv * head_dim * 2))
    cache = sd((pages, block, nkv, head_dim), bf16)
    tables, lens = sd((batch, 64), jnp.int32), sd((batch,), jnp.int32)
    tables_rope = (sd((batch, head_dim), jnp.float32),) * 2 if rope else None
    if kernel == "decode":
        new = (sd((batch, nkv, head_dim), bf16),) * 2 + (sd((batch,), jnp.int32),) if write else None
        fn = functools.partial(paged_decode_attention_tuned, block_n=block_n)
        return (lambda q, kc, vc, bt, ln, r, w: fn(q, kc, vc, bt, ln, r, w),
                (sd((batch, nq, head_dim), bf16), cache, cache, tables, lens, tables_rope, new))
    if kernel == "write":
        return (lambda k, v, kc, vc, slots, r: write_kv_cache_tuned(k, v, kc, vc, slots, r),
                (sd((batch, nkv, head_dim), bf16), sd((batch, nkv, head_dim), bf16), cache, cache,
                 sd((batch,), jnp.int32), tables_rope))
    if kernel == "ragged":  # a prefill chunk: 8 sequences of 512 new tokens
        tokens, seqs = 4096, 8
        fn = functools.partial(ragged_paged_attention_tuned, block_n=block_n)
        return (lambda q, kc, vc, bt, ln, cu: fn(q, kc, vc, bt, ln, cu),
                (sd((tokens, nq, head_dim), bf16), cache, cache, sd((seqs, 64), jnp.int32),
                 sd((seqs,), jnp.int32), sd((seqs + 1,), jnp.int32)))
    raise ValueError(f"kernel {kernel!r}; allowed: decode, write, ragged")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default="decode,write,ragged")
    p.add_argument("--head-dim", default="64,128")
    p.add_argument("--pool-gib", default="20", help="page pool size(s); above 4 GiB the "
                   "Triton lowering computes 64-bit offsets")
    p.add_argument("--block-n", default="default", help="decode and ragged key tiles")
    p.add_argument("--write", default="0", help="decode with the KV write inside (0, 1 or both)")
    p.add_argument("--rope", default="1")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated")
    split = lambda s, cast: [None if x == "default" else cast(x) for x in s.split(",")]  # noqa: E731
    rows = []
    for kernel, hd, gib, bn, write, rope in itertools.product(
            args.kernels.split(","), split(args.head_dim, int), split(args.pool_gib, float),
            split(args.block_n, int), split(args.write, int), split(args.rope, int)):
        if (kernel != "decode" and write) or (kernel == "write" and bn is not None):
            continue  # options that kernel does not have
        if kernel == "ragged":
            if rope != split(args.rope, int)[0]:
                continue  # it takes q already rotated: one row whatever --rope says
            rope = 0
        fn, abstract = kernel_call(kernel, hd, gib, bn, bool(write), bool(rope))
        captured: list = []
        with lowering_for_h100(captured):
            jax.jit(fn).trace(*abstract).lower(lowering_platforms=("cuda",))
        for launch in captured:
            usage = ptxas_usage(launch["ir"], launch["num_warps"], launch["num_stages"])
            rows.append((kernel, hd, gib, "default" if bn is None else bn, write, rope,
                         launch["num_warps"], launch["num_stages"], usage))
    print(f"{'kernel':8} {'H':>4} {'pool GiB':>8} {'tile':>7} {'write':>5} {'rope':>4} "
          f"{'warps':>5} {'stages':>6} {'regs':>5} {'spills':>7} {'programs/SM':>11}")
    for kernel, hd, gib, bn, write, rope, warps, stages, u in rows:
        print(f"{kernel:8} {hd:>4} {gib:>8g} {bn!s:>7} {write:>5} {rope:>4} {warps:>5} {stages:>6} "
              f"{u['registers']!s:>5} {u['spill_store_bytes']!s:>7} "
              f"{u['programs_per_sm_by_registers']!s:>11}")


if __name__ == "__main__":
    main()
