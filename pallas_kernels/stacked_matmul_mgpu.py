"""Stacked matmul through Mosaic GPU: ``x @ w[layer]`` with TMA loads and wgmma (Hopper).

Same contract as ``pallas_kernels.stacked_matmul`` / ``stacked_matmul_fused`` (whose references
it shares): the weight stacks [L, D_in, D_out] are read in place at a traced layer index, several
stacks of one D_in go in one launch (q/k/v), and ``epilogue="silu_mul"`` on (gate, up) stores
``silu(gate) * up`` only. The Triton kernel issues its tile loads from every thread; here the
Tensor Memory Accelerator copies whole [block_k, block_n] weight tiles into swizzled shared
memory, several steps ahead (``max_concurrent_steps``), and one warpgroup (128 threads) multiplies
them asynchronously with wgmma while the next copies land.

Design:
- Persistent programs (one or two per SM) walk the output tiles (``plgpu.nd_loop``): T blocks
  fastest, so the programs that read the same weight tile run side by side and the second finds
  it in L2, as in the Triton kernel.
- A tile is one ``plgpu.emit_pipeline`` over D_in in ``block_k`` steps: step k's wgmma runs while
  steps k+1.. are in flight; each step waits until at most its own wgmma group is pending
  (``delay_release=1``), so a slot is refilled only after the wgmma that read it is done.
- ``warp_specialized=True``: a memory warpgroup issues the copies and two compute warpgroups each
  multiply half of the tile's rows by the same weight tile
  (``plgpu.emit_pipeline_warp_specialized``); measured best for silu_mul.
- The f32 accumulator lives in registers (``plgpu.ACC``). The epilogue rounds it to x's dtype
  (silu_mul: rounds gate and up, then ``silu(gate) * up`` in f32, as the unfused model does),
  stages it in shared memory and writes it with one TMA store.
- wgmma needs 64-row multiples: x is padded with zero rows to a multiple of ``block_m`` (which
  shrinks to T rounded up to 64 for a smaller T) and the output sliced back.

``interpret=None`` runs Mosaic GPU's CPU interpreter on a CPU backend (the tests), the real
kernel on a GPU. ``mosaic_settings`` (end of file) is where ``stacked_matmul(kernel="auto")``
takes this kernel, and with which settings.
"""

import functools
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mgpu_common import (WGMMA_MIN_COLS, WGMMA_ROWS, interpret_params, num_sms,
                                        round_up, warp_specialized_pipeline)
from pallas_kernels.stacked_common import (check_epilogue, check_stacks, fit_block,
                                           silu_mul_epilogue)

DEFAULT_BLOCK_M = 128
DEFAULT_BLOCK_N = 128
DEFAULT_BLOCK_K = 64
DEFAULT_STEPS = 4
# stacked_matmul's kernel="auto" runs a launch through this kernel (mosaic_settings) where that
# measured faster on an H100 (benchmarks/stacked_matmul.py --variants launch --launch-kernels
# triton mgpu; results/session9_2026-11-27, NOTES_kernels):
# - T 256 (llama-3.2-1b, llama-3.1-8b): with at least _MOSAIC_MIN_TILES output tiles of 128
#   rows it beat the Triton kernel by 10-17% (q/k/v of both models, o and down of the 8B,
#   silu_mul of both, warp-specialized). With fewer (the 1B's o and down: 64 tiles for the 132
#   SMs) it lost by 3-5%.
# - T 64 and 128 (llama-3.1-8b only): 64-column tiles with 8 steps in flight beat it by 5-16%
#   on q/k/v, o and down, also at 64 tiles (o, down: each tile streams 4096 rows); silu_mul
#   tied. The rule there: not silu_mul, at least _MOSAIC_MIN_TILES_SMALL_T tiles.
# - Below T 64 nothing was measured: Triton.
# - T 256 with fewer tiles (llama-3.2-1b's o and down): D_in split in two across 128 programs of
#   128 x 64 tiles, 6 steps in flight, beat Triton's own split by 12-14% (eleventh session,
#   results/session11_2026-11-27/launch_split_*); JAXPAGED_MOSAIC_SPLIT=0 turns that rule off.
_MOSAIC_MIN_TOKENS = 64
_MOSAIC_LARGE_T = 129
_MOSAIC_MIN_TILES = 96
_MOSAIC_MIN_TILES_SMALL_T = 64
_TUNING = ("block_m", "block_n", "block_k", "max_concurrent_steps", "programs_per_sm",
           "swizzle", "warp_specialized", "num_splits", "sum_partials", "interpret")


def _smem_transforms(row_elems: int, itemsize: int, swizzle: bool) -> tuple:
    """Explicit tiling + swizzle for a TMA tile whose rows hold ``row_elems`` elements (empty:
    Mosaic GPU infers them)."""
    if not swizzle:
        return ()
    sw = plgpu.find_swizzle(row_elems * itemsize * 8)
    return (plgpu.TilingTransform((8, sw // itemsize)), plgpu.SwizzleTransform(sw))


def _for_each_tile(m_tiles: int, col_starts: tuple[int, ...], silu_mul: bool, project,
                   splits: int = 1) -> None:
    """The persistent loop over output tiles, row blocks fastest, then D_in splits. Calls
    project(mi, nb, i, sk): row block mi, column block nb of weight i (None with silu_mul: gate
    and up together), D_in split sk."""
    @plgpu.nd_loop((m_tiles * splits * col_starts[-1],), collective_axes="sm")
    def _tile(info):
        (idx,) = info.index
        mi, rest = lax.rem(idx, m_tiles), lax.div(idx, m_tiles)
        sk, n = lax.rem(rest, splits), lax.div(rest, splits)
        if silu_mul:
            project(mi, n, None, sk)
            return
        num_weights = len(col_starts) - 1
        for i in range(num_weights):
            def run(i=i):
                project(mi, n - col_starts[i], i, sk)
            if num_weights == 1:
                run()
            else:  # column block n belongs to weight i when col_starts[i] <= n < col_starts[i + 1]
                pl.when((n >= col_starts[i]) & (n < col_starts[i + 1]))(run)


def _kernel(layer_gmem, x_gmem, *refs, num_weights: int, col_starts: tuple[int, ...],
            silu_mul: bool, m_tiles: int, block_m: int, block_n: int, block_k: int,
            k_steps: int, steps: int, splits: int, x_transforms: tuple, w_transforms: tuple):
    # A slot is refilled one step after its wgmma was issued (delay_release=1), once that wgmma
    # is done: each step leaves only its own wgmma group(s) in flight. One step: no overlap.
    # With D_in split (splits > 1) a tile covers k_steps of its split's D_in and stores its f32
    # partial sum at row block sk * m_tiles + mi.
    delay = 1 if steps > 1 else 0
    w_refs, o_refs = refs[:num_weights], refs[num_weights:]
    layer = layer_gmem[0]

    def pipeline(body, mi, nb, ws, sk):
        spec = functools.partial(plgpu.BlockSpec, delay_release=delay)
        k0 = sk * k_steps
        plgpu.emit_pipeline(
            body,
            grid=(k_steps,),
            in_specs=[spec((block_m, block_k), lambda k: (mi, k0 + k), transforms=x_transforms)]
            + [spec((block_k, block_n), lambda k: (k0 + k, nb), transforms=w_transforms)
               for _ in ws],
            max_concurrent_steps=steps,
        )(x_gmem, *(w.at[layer] for w in ws))

    def store(o_ref, value, mi, nb):
        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((block_m, block_n), o_ref.dtype))
        def _(o_smem):
            o_smem[...] = value.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(
                o_smem, o_ref.at[pl.ds(mi * block_m, block_m), pl.ds(nb * block_n, block_n)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    def project(mi, nb, w_ref, o_ref, sk):
        def acc_scope(acc):
            def body(_, x_smem, w_smem):
                plgpu.wgmma(acc, x_smem, w_smem)
                plgpu.wgmma_wait(delay)
            pipeline(body, mi, nb, (w_ref,), sk)
            return acc[...]

        store(o_ref, pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n))),
              sk * m_tiles + mi, nb)

    def project_silu_mul(mi, nb):
        def acc_scope(acc_gate, acc_up):
            def body(_, x_smem, gate_smem, up_smem):
                plgpu.wgmma(acc_gate, x_smem, gate_smem)
                plgpu.wgmma(acc_up, x_smem, up_smem)
                plgpu.wgmma_wait(2 * delay)
            pipeline(body, mi, nb, w_refs, 0)
            return silu_mul_epilogue(acc_gate[...], acc_up[...], o_refs[0].dtype)

        value = pl.run_scoped(acc_scope, plgpu.ACC((block_m, block_n)),
                              plgpu.ACC((block_m, block_n)))
        store(o_refs[0], value, mi, nb)

    def project_tile(mi, nb, i, sk):
        if i is None:
            project_silu_mul(mi, nb)
        else:
            project(mi, nb, w_refs[i], o_refs[i], sk)

    _for_each_tile(m_tiles, col_starts, silu_mul, project_tile, splits)


def _kernel_ws(layer_gmem, x_gmem, *refs, num_weights: int, col_starts: tuple[int, ...],
               silu_mul: bool, m_tiles: int, block_m: int, block_n: int, block_k: int,
               k_steps: int, steps: int, splits: int, x_transforms: tuple, w_transforms: tuple):
    """Warp-specialized: a memory warpgroup issues the TMA copies, two compute warpgroups each
    multiply half of the tile's ``block_m`` rows by the same weight tile (read once a tile).
    With D_in split (splits > 1) a tile covers k_steps of its split's D_in and stores its f32
    partial sum at row block sk * m_tiles + mi, as in _kernel."""
    w_refs, o_refs = refs[:num_weights], refs[num_weights:]
    layer = layer_gmem[0]
    wg_m = block_m // 2
    tile_weights = 2 if silu_mul else 1
    delay = 1 if steps > 1 else 0

    def make_pipeline(body, compute_context):
        spec = functools.partial(plgpu.BlockSpec, delay_release=delay)
        return warp_specialized_pipeline(
            body, compute_context,
            [spec((block_m, block_k), lambda k: (0, k), transforms=x_transforms)]
            + [spec((block_k, block_n), lambda k: (k, 0), transforms=w_transforms)
               for _ in range(tile_weights)],
            k_steps, steps)

    def ignore(*_, **__):
        return None

    allocations = make_pipeline(ignore, ignore).get_allocations(
        x_gmem, *(w_refs[0] for _ in range(tile_weights)))
    o_dtype = o_refs[0].dtype

    @functools.partial(pl.run_scoped, allocations=allocations,
                       o_smem=plgpu.SMEM((2, wg_m, block_n), o_dtype), collective_axes="wg")
    def _scope(allocations, o_smem):
        wg = lax.axis_index("wg")

        def run(mi, nb, ws, o_ref, sk):
            row0 = (sk * m_tiles + mi) * block_m + wg * wg_m  # this warpgroup's output rows
            k_cols = pl.ds(sk * k_steps * block_k, k_steps * block_k)  # the split's D_in

            def compute_context(eval_pipeline):
                def acc_scope(*accs):
                    eval_pipeline(accs)
                    if silu_mul:
                        value = silu_mul_epilogue(accs[0][...], accs[1][...], o_dtype)
                    else:
                        value = accs[0][...]
                    o_smem[wg] = value.astype(o_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        o_smem.at[wg],
                        o_ref.at[pl.ds(row0, wg_m), pl.ds(nb * block_n, block_n)])
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                pl.run_scoped(acc_scope, *(plgpu.ACC((wg_m, block_n))
                                           for _ in range(tile_weights)))

            def body(_, x_smem, *w_smems_and_accs):
                w_smems, accs = w_smems_and_accs[:-1], w_smems_and_accs[-1]
                rows = x_smem.at[pl.ds(wg * wg_m, wg_m)]
                for acc, w_smem in zip(accs, w_smems):
                    plgpu.wgmma(acc, rows, w_smem)
                plgpu.wgmma_wait(delay * tile_weights)
                return accs

            make_pipeline(body, compute_context)(
                x_gmem.at[pl.ds(mi * block_m, block_m), k_cols],
                *(w.at[layer, k_cols, pl.ds(nb * block_n, block_n)] for w in ws),
                allocations=allocations)

        def project_tile(mi, nb, i, sk):
            if i is None:
                run(mi, nb, w_refs, o_refs[0], sk)
            else:
                run(mi, nb, (w_refs[i],), o_refs[i], sk)

        _for_each_tile(m_tiles, col_starts, silu_mul, project_tile, splits)


@functools.partial(jax.jit, static_argnames=("epilogue",) + _TUNING)
def stacked_matmul_mgpu(
    x: jax.Array,  # [T, D_in]
    ws: tuple[jax.Array, ...],  # [L, D_in, D_out_i] each, one D_in and L
    layer: jax.Array,  # i32 scalar, may be traced
    *,
    epilogue: str | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int = DEFAULT_BLOCK_N,
    block_k: int = DEFAULT_BLOCK_K,
    max_concurrent_steps: int = DEFAULT_STEPS,
    programs_per_sm: int = 1,
    swizzle: bool = False,
    warp_specialized: bool = False,
    num_splits: int = 1,
    sum_partials: bool = True,
    interpret: bool | None = None,
) -> tuple[jax.Array, ...] | jax.Array:
    """``x @ w[layer]`` for every ``w`` in ``ws`` in one launch; see ``stacked_matmul_fused``
    for the outputs (a tuple of [T, D_out_i], or one [T, F] with epilogue="silu_mul").

    ``block_m`` (a multiple of 64) shrinks to T rounded up to 64 when T is smaller; ``block_n``
    and ``block_k`` shrink to the largest power of two dividing every D_out and D_in.
    ``max_concurrent_steps``: TMA copies in flight a tile.
    ``programs_per_sm``: persistent programs per SM. ``swizzle``: explicit shared-memory tiling
    and swizzle instead of Mosaic GPU's inferred layout. ``num_splits``: D_in split across that
    many tiles of each output tile (more programs for a launch with few output tiles), each
    storing an f32 partial sum that XLA adds up (not with silu_mul);
    ``sum_partials=False`` returns those partials instead, f32 [num_splits, T', D_out_i] with T'
    the row count padded to ``block_m`` (rows past T are padding), for a consumer that adds
    them itself (``pallas_kernels.add_rms_norm``)."""
    check_epilogue(ws, epilogue)
    ws = tuple(ws)
    check_stacks(x, ws, layer)
    silu_mul = epilogue == "silu_mul"
    dtypes = {jnp.dtype(a.dtype) for a in (x, *ws)}
    if dtypes - {jnp.dtype(jnp.bfloat16)} and dtypes - {jnp.dtype(jnp.float16)}:
        raise ValueError(f"x and the stacks must all be bfloat16 or all float16 (wgmma); got "
                         f"{sorted(str(d) for d in dtypes)}")
    num_tokens, d_in = x.shape
    d_outs = [w.shape[2] for w in ws]
    if num_tokens == 0:
        return jnp.zeros((0, d_outs[0]), x.dtype) if silu_mul else tuple(
            jnp.zeros((0, d), x.dtype) for d in d_outs)
    # warp_specialized: two compute warpgroups split block_m, each a multiple of 64 rows.
    row_unit = 2 * WGMMA_ROWS if warp_specialized else WGMMA_ROWS
    if block_m <= 0 or block_m % row_unit:
        raise ValueError(f"block_m={block_m} must be a positive multiple of {row_unit} "
                         f"(wgmma rows; warp_specialized={warp_specialized})")
    block_m = min(block_m, round_up(num_tokens, row_unit))
    # One block_n for every weight, so that a column block is never shared by two of them.
    block_n = fit_block(block_n, math.gcd(*d_outs), WGMMA_MIN_COLS, "D_out", "wgmma's N")
    block_k = fit_block(block_k, d_in, 16, "D_in", "wgmma's K")
    k_steps = d_in // block_k
    if num_splits > 1 and silu_mul:
        raise ValueError("num_splits > 1 is for plain projections: not with epilogue='silu_mul'")
    if num_splits < 1 or k_steps % num_splits:
        raise ValueError(f"num_splits={num_splits} must divide D_in / block_k = {k_steps}")
    padded = round_up(num_tokens, block_m)
    x_padded = jnp.pad(x, ((0, padded - num_tokens), (0, 0))) if padded != num_tokens else x
    col_blocks = [d // block_n for d in d_outs[:1 if silu_mul else None]]
    m_tiles = padded // block_m
    num_tiles = m_tiles * sum(col_blocks) * num_splits
    kernel = functools.partial(
        _kernel_ws if warp_specialized else _kernel, num_weights=len(ws),
        col_starts=tuple(itertools.accumulate(col_blocks, initial=0)), silu_mul=silu_mul,
        m_tiles=m_tiles, block_m=block_m, block_n=block_n, block_k=block_k,
        k_steps=k_steps // num_splits, steps=min(max_concurrent_steps, k_steps // num_splits),
        splits=num_splits,
        x_transforms=_smem_transforms(block_k, x.dtype.itemsize, swizzle),
        w_transforms=_smem_transforms(block_n, ws[0].dtype.itemsize, swizzle))
    out_dtype = jnp.float32 if num_splits > 1 else x.dtype
    out_shapes = [jax.ShapeDtypeStruct((num_splits * padded, d), out_dtype)
                  for d in d_outs[:len(col_blocks)]]
    interp = interpret_params(interpret)
    programs = 4 if interp else num_sms() * programs_per_sm
    # The shape in the name tells a device profile's launches apart (q/k/v, o, down).
    name = f"stacked_matmul_mgpu{'_silu_mul' if silu_mul else ''}_{d_in}x{sum(d_outs)}"
    if num_splits > 1:
        name += f"_split{num_splits}"
    outs = plgpu.kernel(
        kernel,
        out_type=tuple(out_shapes),
        grid=(min(num_tiles, programs),),
        grid_names=("sm",),
        **(dict(num_threads=3, thread_name="wg") if warp_specialized else {}),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interp,
        kernel_name=name,
    )(jnp.reshape(layer, (1,)).astype(jnp.int32), x_padded, *ws)
    if num_splits > 1 and not sum_partials:
        outs = tuple(o.reshape(num_splits, padded, -1) for o in outs)
    elif num_splits > 1:  # f32 partial sums [splits * padded, d] -> their sum in x's dtype
        outs = tuple(o.reshape(num_splits, padded, -1)[:, :num_tokens].sum(axis=0).astype(x.dtype)
                     for o in outs)
    elif padded != num_tokens:
        outs = tuple(o[:num_tokens] for o in outs)
    return outs[0] if silu_mul else tuple(outs)


@functools.lru_cache(maxsize=4)
def _measurement_settings(raw: str) -> dict[str, dict]:
    table = json.loads(raw)
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"JAXPAGED_MOSAIC_SETTINGS must map launch names to settings; got "
                         f"{raw!r}")
    for settings in table.values():
        unknown = set(settings) - set(_TUNING)
        if unknown:
            raise ValueError(f"JAXPAGED_MOSAIC_SETTINGS: unknown settings {sorted(unknown)}")
    return table


def mosaic_settings(num_tokens: int, d_in: int, d_outs: list[int], silu_mul: bool,
                    dtype) -> dict | None:
    """stacked_matmul_mgpu's settings for a launch where kernel="auto" picks it, else None.

    For measurements, ``JAXPAGED_MOSAIC_SETTINGS`` (JSON) replaces the rule's settings of
    launches of T >= 129 by name, the name being the kernel's shape as a device profile shows it
    (``"2048x3072"``, ``"silu_mul_2048x16384"``: D_in x the sum of D_out), e.g.
    ``{"8192x2048": {"warp_specialized": true, "block_n": 128, "num_splits": 4}}``."""
    if (num_tokens < _MOSAIC_MIN_TOKENS or d_in % 64
            or jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))):
        return None
    raw = os.environ.get("JAXPAGED_MOSAIC_SETTINGS")
    name = f"{'silu_mul_' if silu_mul else ''}{d_in}x{sum(d_outs)}"
    if raw and num_tokens >= _MOSAIC_LARGE_T and name in _measurement_settings(raw):
        return dict(_measurement_settings(raw)[name])
    row_tiles = pl.cdiv(num_tokens, 128)
    if num_tokens < _MOSAIC_LARGE_T:  # one row tile (64 rows at T 64)
        if (silu_mul or any(d % 64 for d in d_outs)
                or sum(d // 64 for d in d_outs) < _MOSAIC_MIN_TILES_SMALL_T):
            return None
        return dict(block_m=128, block_n=64, max_concurrent_steps=8)
    if silu_mul:
        if d_outs[0] % 128 == 0 and row_tiles * d_outs[0] // 128 >= _MOSAIC_MIN_TILES:
            return dict(warp_specialized=True, block_m=128, block_n=128, max_concurrent_steps=4)
        return None
    # Wide tiles where they still make enough tiles, then narrow ones with more steps in flight
    # (the most that fit in shared memory; more steps measured faster at every shape), then
    # narrow ones with D_in split in two (f32 partials in shared memory leave room for 6 steps).
    for block_n, steps in ((128, 5), (64, 8)):
        if (all(d % block_n == 0 for d in d_outs)
                and row_tiles * sum(d // block_n for d in d_outs) >= _MOSAIC_MIN_TILES):
            return dict(block_m=128, block_n=block_n, max_concurrent_steps=steps)
    if (os.environ.get("JAXPAGED_MOSAIC_SPLIT", "1") != "0" and d_in % 128 == 0
            and all(d % 64 == 0 for d in d_outs)
            and 2 * row_tiles * sum(d // 64 for d in d_outs) >= _MOSAIC_MIN_TILES):
        return dict(block_m=128, block_n=64, max_concurrent_steps=6, num_splits=2)
    return None
