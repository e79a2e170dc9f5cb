"""XLA flags jaxpaged turns on by default, before JAX creates its backend.

Prefill and mixed steps run the layer loop as a `lax.scan` over stacked weights, and XLA copies
each layer's matrices out of the stacks before its GEMMs (decode steps avoid that through
`pallas_kernels.stacked_matmul`). With dynamic-slice fusion a cuBLAS GEMM reads its layer's
slice in place instead; it applies to cuBLAS calls only, so XLA's Triton GEMM fusions are
turned off with it. Measured on an H100 (benchmarks/NOTES_engine.md): llama-3.2-1b's
non-decode time in issue 5's workload 1.24 -> 1.14 s, llama-3.1-8b's mixed steps in the
batching experiment 21.3 -> 18.3 s (paged throughput +12%), and the 8B's cold warm-up ~50 ->
31 s (no Triton GEMM autotuning).

Not among them: XLA's command buffers (CUDA graphs) for every kernel kind with no minimum graph
size. Over the unrolled decode step one A/B on an H100 (bb228db) looked +26% for llama-3.2-1b
(30,748 -> 38,753 tok/s), but the next revision, with them on by default, then ran twelve
times on that machine at 27,189-41,225 tok/s: the host's run-to-run spread covers the
difference, and the host's time to dispatch a forward stayed ~1.25 ms with them
(benchmarks/NOTES_engine.md, seventh session). Unproven, so left out.

XLA reads XLA_FLAGS once, when JAX first creates a backend: importing jaxpaged before any JAX
computation runs applies them. Flags already in XLA_FLAGS are left as they are;
JAXPAGED_XLA_FLAGS=0 adds none. They affect the whole process (every jitted function).

JAXPAGED_COMMAND_BUFFERS picks XLA's command buffers (CUDA graphs) for measurements: `xla`
(default) leaves XLA's own choice, `none` turns them off, `all` records every kind of thunk XLA
can (loops and conditionals too) with no minimum graph size. Like the defaults, it adds its
flags only where XLA_FLAGS does not set them. On an H100 (benchmarks/NOTES_engine.md, fifteenth
session) llama-3.2-1b's windowed decode step took 3.46 ms with `xla`, 3.55 with `none` and
3.49-3.50 with `all`: XLA's own choice stays.
"""

import os

DEFAULT_XLA_FLAGS = {
    "xla_gpu_enable_dynamic_slice_fusion": "true",
    "xla_gpu_enable_triton_gemm": "false",
}

COMMAND_BUFFER_FLAGS = {
    "xla": {},
    "none": {"xla_gpu_enable_command_buffer": ""},
    "all": {"xla_gpu_enable_command_buffer":
            "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL",
            "xla_gpu_graph_min_graph_size": "1"},
}


def apply_default_xla_flags(environ=os.environ) -> list[str]:
    """Appends each DEFAULT_XLA_FLAGS entry that XLA_FLAGS does not already set; -> the flags
    added."""
    setting = environ.get("JAXPAGED_XLA_FLAGS", "1")
    if setting not in ("0", "1"):
        raise ValueError(f"JAXPAGED_XLA_FLAGS={setting!r}; allowed: 0, 1")
    if setting == "0":
        return []
    buffers = environ.get("JAXPAGED_COMMAND_BUFFERS", "xla")
    if buffers not in COMMAND_BUFFER_FLAGS:
        raise ValueError(f"JAXPAGED_COMMAND_BUFFERS={buffers!r}; allowed: "
                         + ", ".join(COMMAND_BUFFER_FLAGS))
    current = environ.get("XLA_FLAGS", "")
    wanted = {**DEFAULT_XLA_FLAGS, **COMMAND_BUFFER_FLAGS[buffers]}
    added = [f"--{name}={value}" for name, value in wanted.items()
             if f"--{name}=" not in current and f"--{name} " not in f"{current} "]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
