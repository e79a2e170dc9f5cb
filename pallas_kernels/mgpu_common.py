"""What the Mosaic GPU kernels share: the interpreter's parameters, the SM count, row padding
and the warp-specialized pipeline both matmul kernels run (``stacked_matmul_mgpu``'s
``_kernel_ws``, ``lm_head_argmax``)."""

import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.stacked_common import use_interpret

WGMMA_ROWS = 64  # a warpgroup's wgmma covers 64 rows of x at a time
# The narrowest [K, N] B tile that lowers for the GPU: with 8 columns Mosaic GPU finds no wgmma
# tiling (its CPU interpreter runs it all the same), so column tiles are 16 wide at least.
WGMMA_MIN_COLS = 16


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def num_sms() -> int:
    device = jax.devices()[0]
    return getattr(device, "core_count", None) or 132


def interpret_params(interpret: bool | None, detect_races: bool = False):
    """Mosaic GPU's CPU interpreter's parameters where ``use_interpret``, else None (the real
    kernel)."""
    if not use_interpret(interpret):
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private, jax 0.11
    return InterpretGPUParams(detect_races=detect_races)


def warp_specialized_pipeline(body, compute_context, in_specs: list, k_steps: int, steps: int):
    """``plgpu.emit_pipeline_warp_specialized`` over ``k_steps`` with one memory warpgroup (40
    registers a thread) issuing the copies of ``in_specs`` ``steps`` ahead, and two compute
    warpgroups (``"wg"`` 0 and 1) running ``body`` inside ``compute_context``."""
    return plgpu.emit_pipeline_warp_specialized(
        body,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=in_specs,
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=steps,
        compute_context=compute_context,
    )
