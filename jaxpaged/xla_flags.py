"""XLA flags jaxpaged turns on by default, before JAX creates its backend.

Prefill and mixed steps run the layer loop as a `lax.scan` over stacked weights, and XLA copies
each layer's matrices out of the stacks before its GEMMs (decode steps avoid that through
`pallas_kernels.stacked_matmul`). With dynamic-slice fusion a cuBLAS GEMM reads its layer's
slice in place instead; it applies to cuBLAS calls only, so XLA's Triton GEMM fusions are
turned off with it. Measured on an H100 (benchmarks/NOTES_engine.md): llama-3.2-1b's
non-decode time in issue 5's workload 1.24 -> 1.14 s, llama-3.1-8b's mixed steps in the
batching experiment 21.3 -> 18.3 s (paged throughput +12%), and the 8B's cold warm-up ~50 ->
31 s (no Triton GEMM autotuning).

Command buffers (CUDA graphs) take every kernel kind but loops and conditionals, with no
minimum graph size: an unrolled decode step (`runner.unroll_setting`) has no while loop, so the
host launches its ~186 kernels as a few graphs instead of one by one. Measured on an H100, same
machine (git bb228db): llama-3.2-1b's issue-5 workload 30,748 -> 38,753 output tok/s, decode
step 6.21 -> 4.40 ms (host busy 5.40 -> 3.78 ms), cold warm-up 39 -> 29 s. With loops in the
graphs too (a rolled layer scan captured whole) the same workload was slower (fifth and sixth
sessions), so WHILE and CONDITIONAL stay out.

XLA reads XLA_FLAGS once, when JAX first creates a backend: importing jaxpaged before any JAX
computation runs applies them. Flags already in XLA_FLAGS are left as they are;
JAXPAGED_XLA_FLAGS=0 adds none. They affect the whole process (every jitted function).
"""

import os

DEFAULT_XLA_FLAGS = {
    "xla_gpu_enable_dynamic_slice_fusion": "true",
    "xla_gpu_enable_triton_gemm": "false",
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
    "xla_gpu_graph_min_graph_size": "1",
}


def apply_default_xla_flags(environ=os.environ) -> list[str]:
    """Appends each DEFAULT_XLA_FLAGS entry that XLA_FLAGS does not already set; -> the flags
    added."""
    setting = environ.get("JAXPAGED_XLA_FLAGS", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"JAXPAGED_XLA_FLAGS={setting!r}; allowed: 0, 1")
    if setting == "0":
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in DEFAULT_XLA_FLAGS.items()
             if f"--{name}=" not in current and f"--{name} " not in f"{current} "]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
