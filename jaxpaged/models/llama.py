"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in Flax NNX over a paged KV cache.

Layers are stacked on a leading axis and run with `lax.scan`, so a model compiles one layer
body whatever its depth; the whole KV cache rides in the scan carry and each layer writes and
reads it through `attention.paged_attention` (no per-layer cache slice is copied). With
`unroll=True` the layers run in a Python loop instead: each layer's index is a constant and its
weights are static slices that feed the matmuls in place, where a rolled loop copies them out of
the stack every step (on an H100, llama-3.2-1b's forward at batch 256: 3.95 -> 2.41 ms); with
XLA's GEMMs the compiles take ~30x longer, with the stacked kernels below no longer (the
runner unrolls decode steps where those run, `runner.unroll_setting`).

JAXPAGED_STACKED_MATMUL (default: on where JAX's backend is a GPU; the runner reads it once and
passes it to its programs as a static argument, `forward(stacked_matmul=None)` reads it when traced)
avoids those copies another way in decode-only steps with impl="pallas", in a rolled loop or an
unrolled one: the seven projection kernels (q, k, v, o, gate, up, down) stay out of the loop's
per-layer slices and each layer's matmuls read their slices of the stacks in place, given the layer
index, in four launches a layer: q/k/v in one (`pallas_kernels.stacked_matmul_fused`; biases added
after), silu(gate) * up in one (its silu_mul epilogue), o and down on their own
(`pallas_kernels.stacked_matmul`). Norm scales and biases are still sliced per layer; other steps
and the reference impl keep the plain path, as does a model whose projection widths (per shard) are
not multiples of the kernels' smallest tile, 16. Under a tensor-parallel mesh each launch runs per
shard through `shard_map` on the shard's own slice of the stacks, exactly as `sharding.param_spec`
places them: q/k/v and gate/up on their output columns (x whole; silu_mul pairs gate and up column
by column, so it holds per shard), o and down on their input rows, then a psum over the shards, the
all-reduce Megatron has there (the plain path lets XLA insert it). The parameter tree is the same.

JAXPAGED_FUSED_ADD_NORM (default on) joins, on that stacked path without a mesh and at a model
width that is a power of two, each residual add to the norm after it in one launch
(`pallas_kernels.add_rms_norm`), fed the o and down projections' f32 partial sums where those
launches split D_in; the layer loop then carries the residual stream and its normalised form,
and each layer's last junction applies the next layer's input norm (the final norm after the
last layer).

Dimensions: T tokens, D model, N query heads, K kv heads, H head dim, F MLP, V vocab, L layers.
"""

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

import pallas_kernels
from jaxpaged.attention import KVCache, paged_attention
from jaxpaged.config import ModelConfig
from jaxpaged.metadata import AttentionMetadata
from jaxpaged.sampler import greedy_head
from jaxpaged.settings import on_for_gpu, switch
from jaxpaged.sharding import TP_AXIS, param_spec
from pallas_kernels.add_rms_norm import rms_norm
from pallas_kernels.stacked_matmul import MIN_BLOCK

logger = logging.getLogger(__name__)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def stacked_matmul_setting() -> bool:
    """JAXPAGED_STACKED_MATMUL: "1" reads decode steps' projection weights in place from the
    layer stack (see the module docstring), "0" slices them in the scan. Unset: on for a GPU
    backend, where it measured 12-16% more decode throughput on one H100 (llama-3.2-1b and
    llama-3.1-8b) and 14% more on two (llama-3.1-8b at tensor_parallel_size 2, with the same
    greedy tokens in float32 as one GPU; benchmarks/NOTES_engine.md); off on the CPU, where
    XLA's slices cost little and the kernel would run in the Pallas interpreter."""
    return on_for_gpu("JAXPAGED_STACKED_MATMUL")


def stacked_matmul_kernel() -> str:
    """JAXPAGED_MOSAIC_MATMUL: "1" lets the stacked projections run through the Mosaic GPU kernel
    where it measured faster (`pallas_kernels.stacked_matmul`'s kernel="auto"), "0" keeps them on
    the Triton kernel. Unset: on for a GPU backend (read when a step program is traced)."""
    return "auto" if on_for_gpu("JAXPAGED_MOSAIC_MATMUL") else "triton"


def fused_add_norm_setting() -> bool:
    """JAXPAGED_FUSED_ADD_NORM: "1" (default) adds each projection's output to the residual
    and normalises the sum in one launch on the stacked decode path (see the module docstring);
    "0" leaves both to XLA, which on an H100 made three launches a layer of them at
    llama-3.2-1b's batch 256 (benchmarks/NOTES_engine.md, thirteenth session)."""
    return switch("JAXPAGED_FUSED_ADD_NORM", True)


def _is_projection_kernel(path: tuple, _value) -> bool:
    return len(path) >= 2 and path[-1] == "kernel" and path[-2] in PROJECTIONS


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """f32[H // 2] inverse frequencies, with Llama 3's wavelength-dependent rescaling."""
    H = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, H, 2, dtype=np.float32) / H))
    if config.rope_freq_factors is not None:
        return (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq.astype(np.float32)
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin f32[T, H] for the rotate-half layout, computed once per step and shared by
    every layer. The optimization barrier keeps them one kernel a step: without it XLA
    recomputed them in every layer of an unrolled step (a kernel a layer), as it did inside
    the scan."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)
    return jax.lax.optimization_barrier((cos, sin))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def _linear(d_in: int, d_out: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.initializers.normal(0.02)
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      kernel_init=init, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class StackedLayer:
    """Where a decode step's projections read their weights in place: the projections' kernels
    are the whole [L, D_in, D_out] stacks (their biases this layer's) and `layer` indexes them;
    under a `mesh` each shard reads its own slice of the stacks."""
    layer: jax.Array | int  # the scan's i32[], or the unrolled loop's constant
    mesh: Mesh | None


def _split_axis(spec: PartitionSpec) -> int | None:
    """The axis a kernel's spec splits over the mesh, from the end: -1 column-parallel, -2
    row-parallel; None replicated."""
    return next((i - len(spec) for i, axis in enumerate(spec) if axis == TP_AXIS), None)


def _kernel_spec(name: str, shape: tuple[int, ...], tp: int) -> PartitionSpec:
    """How `sharding.param_spec` places projection `name`'s [L, D_in, D_out] stack over tp."""
    return param_spec(("layers", name, "kernel"), shape, tp)


def _stacked_matmuls(x: jax.Array, linears: dict[str, nnx.Linear], at: StackedLayer,
                     epilogue: str | None = None,
                     sum_partials: bool = True) -> tuple[jax.Array, ...]:
    """x [T, D_in] @ each linear's kernel[at.layer], in one launch: a tuple of [T, D_out_i]
    (biases added after), or with epilogue="silu_mul" (gate, up) the 1-tuple silu(gate) * up.
    sum_partials=False (one bias-free linear, no mesh): a launch that splits D_in returns its
    f32 partial sums instead (`pallas_kernels.stacked_matmul`), for add_rms_norm to add.

    Under a mesh the launch runs once per shard on the slices `sharding.param_spec` gave the
    stacks (in_specs equal to the weights' shardings, so nothing is resharded). Column-parallel
    (split on D_out): x whole, the outputs split on their columns. Row-parallel (split on D_in):
    x split on its columns, each shard's partial sums added over the shards (psum). Replicated
    (a width the shards do not divide): every shard runs the whole launch."""
    ws = tuple(linear.kernel[...] for linear in linears.values())
    kernel = stacked_matmul_kernel()

    if not sum_partials and (at.mesh is not None or len(ws) != 1 or epilogue is not None
                             or any(lin.bias is not None for lin in linears.values())):
        raise ValueError("sum_partials=False takes one bias-free linear and no mesh")

    def launch(x, ws, layer) -> tuple[jax.Array, ...]:
        if epilogue is None and len(ws) == 1:
            return (pallas_kernels.stacked_matmul(x, ws[0], layer, kernel=kernel,
                                                  sum_partials=sum_partials),)
        out = pallas_kernels.stacked_matmul_fused(x, ws, layer, epilogue=epilogue, kernel=kernel)
        return (out,) if epilogue is not None else out

    if at.mesh is None:
        outs = launch(x, ws, at.layer)
    else:
        tp = at.mesh.shape[TP_AXIS]
        specs = tuple(_kernel_spec(name, w.shape, tp) for name, w in zip(linears, ws))
        split = {_split_axis(spec) for spec in specs}
        if len(split) > 1:  # cannot happen for the Megatron specs: one launch, one split
            raise ValueError(f"{tuple(linears)} share one launch but split differently over "
                             f"the mesh: {specs}")
        (axis,) = split
        sliced = PartitionSpec(None, TP_AXIS)  # [T, D] split on its columns

        def per_shard(x, ws, layer) -> tuple[jax.Array, ...]:
            outs = launch(x, ws, layer)
            return tuple(jax.lax.psum(o, TP_AXIS) for o in outs) if axis == -2 else outs

        num_outs = 1 if epilogue is not None else len(ws)
        # check_vma off: pallas_call does not type its outputs as varying over the mesh axis.
        outs = jax.shard_map(
            per_shard, mesh=at.mesh, check_vma=False,
            in_specs=(sliced if axis == -2 else PartitionSpec(), specs, PartitionSpec()),
            out_specs=(sliced if axis == -1 else PartitionSpec(),) * num_outs,
        )(x, ws, at.layer)
    if epilogue is not None:
        return outs
    return tuple(y if lin.bias is None else y + lin.bias[...]
                 for y, lin in zip(outs, linears.values()))


@functools.cache  # _stacked_tiles_fit runs at every trace: say it once
def _say_unfit(name: str, shape: tuple[int, int], tp: int) -> None:
    logger.info("%s's [D_in, D_out] per shard %s is not a multiple of %d (tp %d): decode steps "
                "keep the plain path", name, list(shape), MIN_BLOCK, tp)


def _stacked_tiles_fit(layers: "DecoderLayer", mesh: Mesh | None) -> bool:
    """Whether every projection stack's per-shard [D_in, D_out] (the whole one without a mesh)
    is a multiple of MIN_BLOCK both ways, as the stacked kernels need. A tp that leaves an odd
    MLP width on each shard (96 / 4 = 24), say, does not: those steps take the plain path."""
    tp = 1 if mesh is None else mesh.shape[TP_AXIS]
    for module in (layers.self_attn, layers.mlp):
        for name in PROJECTIONS:
            linear = getattr(module, name, None)
            if linear is None:
                continue
            shape = list(linear.kernel.shape)  # [L, D_in, D_out]
            axis = _split_axis(_kernel_spec(name, tuple(shape), tp))
            if axis is not None:
                shape[axis] //= tp
            if shape[-2] % MIN_BLOCK or shape[-1] % MIN_BLOCK:
                _say_unfit(name, tuple(shape[-2:]), tp)
                return False
    return True


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.q_proj = _linear(D, N * H, cfg.attention_bias, dtype, rngs)
        self.k_proj = _linear(D, K * H, cfg.attention_bias, dtype, rngs)
        self.v_proj = _linear(D, K * H, cfg.attention_bias, dtype, rngs)
        self.o_proj = _linear(N * H, D, False, dtype, rngs)
        self.q_norm = RMSNorm(H, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(H, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array],
                 kv_cache: KVCache, layer: jax.Array | int, md: AttentionMetadata,
                 impl: str, mesh: Mesh | None, at: StackedLayer | None = None,
                 sum_partials: bool = True) -> tuple[jax.Array, KVCache]:
        """-> (the o projection's output [T, D], or with sum_partials=False on the stacked path
        possibly its f32 partial sums [S, T', D], see _stacked_matmuls; the updated cache)."""
        T = x.shape[0]
        if at is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = _stacked_matmuls(
                x, {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj}, at)
        q = q.reshape(T, self.num_heads, self.head_dim)  # [T, N, H]
        k = k.reshape(T, self.num_kv_heads, self.head_dim)  # [T, K, H]
        v = v.reshape(T, self.num_kv_heads, self.head_dim)  # [T, K, H]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # RoPE is applied by the attention seam (in the kernels on the Pallas path).
        out, kv_cache = paged_attention(q, k, v, kv_cache, layer, md, impl, mesh, rope)
        out = out.reshape(T, -1)  # [T, N * H]
        if at is None:
            return self.o_proj(out), kv_cache
        return _stacked_matmuls(out, {"o_proj": self.o_proj}, at,
                                sum_partials=sum_partials)[0], kv_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(D, F, False, dtype, rngs)
        self.up_proj = _linear(D, F, False, dtype, rngs)
        self.down_proj = _linear(F, D, False, dtype, rngs)

    def __call__(self, x: jax.Array, at: StackedLayer | None = None,
                 sum_partials: bool = True) -> jax.Array:
        """-> [T, D]; with sum_partials=False on the stacked path possibly the down
        projection's f32 partial sums [S, T', D] (see _stacked_matmuls)."""
        if at is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
            return self.down_proj(jax.nn.silu(gate) * up)  # [T, D]
        # One launch; gate and up stay in f32 registers until silu(gate) * up.
        (h,) = _stacked_matmuls(x, {"gate_proj": self.gate_proj, "up_proj": self.up_proj}, at,
                                epilogue="silu_mul")  # [T, F]
        return _stacked_matmuls(h, {"down_proj": self.down_proj}, at,
                                sum_partials=sum_partials)[0]  # [T, D]


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, x, rope, kv_cache, layer, md, impl, mesh, stacked=False):
        """`stacked`: the projections' kernels are the whole [L, ...] stacks (StackedLayer)."""
        at = StackedLayer(layer, mesh) if stacked else None
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), rope, kv_cache, layer, md,
                                            impl, mesh, at)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x), at)
        return x, kv_cache

    def fused_junctions(self, x, normed, post_scales, next_scales, next_index, rope, kv_cache,
                        layer, md, impl):
        """The stacked path with JAXPAGED_FUSED_ADD_NORM, no mesh: x the residual stream,
        `normed` this layer's input norm of it -> (the residual stream after the layer, its
        norm by next_scales[next_index] (the next layer's input norm, or the final norm), the
        cache). post_scales: every layer's post-attention norm scale [L, D], read at `layer`;
        the stacks are read in place by the kernel (a slice would be copied first)."""
        at, eps = StackedLayer(layer, None), self.post_attention_layernorm.eps
        attn_out, kv_cache = self.self_attn(normed, rope, kv_cache, layer, md, impl, None, at,
                                            sum_partials=False)
        x, normed = pallas_kernels.add_rms_norm(x, attn_out, post_scales, layer, eps=eps)
        x, normed = pallas_kernels.add_rms_norm(
            x, self.mlp(normed, at, sum_partials=False), next_scales, next_index, eps=eps)
        return x, normed, kv_cache


class CausalLM(nnx.Module):
    """Embedding, L stacked decoder layers, final norm and LM head (tied or not)."""

    def __init__(self, cfg: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                      param_dtype=dtype,
                                      embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, dtype, rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else _linear(cfg.hidden_size, cfg.vocab_size, False, dtype, rngs))

    def __call__(self, kv_cache: KVCache, input_ids: jax.Array, positions: jax.Array,
                 md: AttentionMetadata, impl: str = "reference",
                 mesh: Mesh | None = None, unroll: bool = False,
                 stacked_matmul: bool | None = None,
                 greedy: bool = False) -> tuple[KVCache, jax.Array]:
        """input_ids, positions i32[T] -> (updated cache, [R, V] logits at md.logits_indices,
        in the model's dtype: the LM head's GEMM rounds to it, so widening to f32 here would
        only write (and the sampler read) twice the bytes; the sampler widens them).
        `mesh`: tensor parallelism; the parameters and cache arrive sharded on it.
        `stacked_matmul`: None follows JAXPAGED_STACKED_MATMUL (see the module docstring).
        `greedy`: i32[R] greedy tokens instead of the logits (`sampler.greedy_head`: the
        sampler's greedy argmax of these logits, where it can in one launch with the head)."""
        x = self.embed_tokens(input_ids)  # [T, D]
        # inv_freq is a compile-time constant; the tables are computed once, outside the scan.
        rope = rope_tables(positions, jnp.asarray(rope_inv_freq(self.config)))
        if stacked_matmul is None:
            stacked_matmul = stacked_matmul_setting()
        stacked = (stacked_matmul and md.decode_only and impl == "pallas"
                   and _stacked_tiles_fit(self.layers, mesh))
        fused_norms = (stacked and mesh is None and fused_add_norm_setting()
                       and pallas_kernels.add_rms_norm_supports(self.config.hidden_size))
        if stacked:
            # The projection kernels stay whole, closed over by the body, never sliced.
            layer_def, kernels, layer_state = nnx.split(self.layers, _is_projection_kernel, ...)
        else:
            layer_def, layer_state = nnx.split(self.layers)

        if fused_norms:
            kv_cache, normed = self._fused_norms_layers(x, kv_cache, layer_def, kernels,
                                                        layer_state, rope, md, impl, unroll)
            return kv_cache, self._head(normed[md.logits_indices], greedy)

        def body(carry, xs):
            x, cache = carry
            state, layer = xs
            layer_mod = (nnx.merge(layer_def, kernels, state) if stacked
                         else nnx.merge(layer_def, state))
            x, cache = layer_mod(x, rope, cache, layer, md, impl, mesh, stacked)
            return (x, cache), None

        x, kv_cache = self._layer_loop(body, (x, kv_cache), layer_state, unroll)
        return kv_cache, self._head(self.norm(x[md.logits_indices]), greedy)  # [R, D] -> [R, V]

    def _layer_loop(self, body, carry, layer_state, unroll: bool):
        """carry after body(carry, (layer i's state, i)) for every layer: a scan, or with
        `unroll` a Python loop, not scan(unroll=True): each layer's index is then a constant of
        the program. Scan's indices are slices of an iota, which XLA does not fold: on an H100
        every layer launched a kernel (or two) just to make its s32[1] index for the stacked
        kernels. The norm scales' slices are static either way."""
        if unroll:
            for i in range(self.config.num_hidden_layers):
                carry, _ = body(carry, (jax.tree.map(lambda a, i=i: a[i], layer_state), i))
            return carry
        layer_ids = jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32)
        return jax.lax.scan(body, carry, (layer_state, layer_ids))[0]

    def _head(self, x: jax.Array, greedy: bool) -> jax.Array:
        """[R, D] final hidden states -> [R, V] logits, or with `greedy` i32[R] tokens."""
        if not greedy:
            return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        tied = self.lm_head is None
        weight = self.embed_tokens.embedding[...] if tied else self.lm_head.kernel[...]
        return greedy_head(x, weight.astype(x.dtype), transposed=tied)

    def _fused_norms_layers(self, x, kv_cache, layer_def, kernels, layer_state, rope, md, impl,
                            unroll):
        """The layers with JAXPAGED_FUSED_ADD_NORM (DecoderLayer.fused_junctions): the loop
        carries the residual stream and its norm for the next layer; layer i's last junction
        normalises by layer i + 1's input norm scale, the last layer's by the final norm's.
        -> (kv cache, the final norm of every token [T, D])."""
        num_layers = self.config.num_hidden_layers
        in_scales = self.layers.input_layernorm.scale[...]  # [L, D]
        post_scales = self.layers.post_attention_layernorm.scale[...]  # [L, D]
        final_scale = self.norm.scale[...]  # [D]
        normed = rms_norm(x, in_scales[0], self.config.rms_norm_eps)

        # A traced layer index (the scan) reads the next scale from one [L + 1, D] stack; a
        # constant one (unrolled) picks its stack statically, with no concatenation to launch.
        stacked_next = None if unroll else jnp.concatenate([in_scales, final_scale[None]])

        def body(carry, xs):
            x, normed, cache = carry
            state, layer = xs
            if stacked_next is not None:
                next_scales, next_index = stacked_next, layer + 1
            elif layer == num_layers - 1:
                next_scales, next_index = final_scale, 0
            else:
                next_scales, next_index = in_scales, layer + 1
            layer_mod = nnx.merge(layer_def, kernels, state)
            return layer_mod.fused_junctions(x, normed, post_scales, next_scales, next_index,
                                             rope, cache, layer, md, impl), None

        _, normed, kv_cache = self._layer_loop(body, (x, normed, kv_cache), layer_state, unroll)
        return kv_cache, normed


def forward(graphdef: nnx.GraphDef, params: nnx.State, kv_cache: KVCache,
            input_ids: jax.Array, positions: jax.Array, md: AttentionMetadata,
            impl: str = "reference", mesh: Mesh | None = None, unroll: bool = False,
            stacked_matmul: bool | None = None,
            greedy: bool = False) -> tuple[KVCache, jax.Array]:
    """The pure forward (STYLE rule 6): jit it with graphdef, impl, mesh, unroll,
    stacked_matmul and greedy static, the cache donated. stacked_matmul=None reads
    JAXPAGED_STACKED_MATMUL when traced. greedy: greedy tokens instead of logits
    (CausalLM.__call__)."""
    return nnx.merge(graphdef, params)(kv_cache, input_ids, positions, md, impl, mesh, unroll,
                                       stacked_matmul, greedy)
