"""jaxpaged's Pallas GPU kernels, each with a pure-jnp reference of the same signature."""

from pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference
from pallas_kernels.add_rms_norm import supports as add_rms_norm_supports
from pallas_kernels.argmax import argmax_rows, argmax_rows_reference
from pallas_kernels.lm_head_argmax import lm_head_argmax, lm_head_argmax_reference
from pallas_kernels.lm_head_argmax import supports as lm_head_argmax_supports
from pallas_kernels.kv_cache_write import write_kv_cache, write_kv_cache_reference
from pallas_kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.stacked_matmul import (stacked_matmul, stacked_matmul_fused,
                                           stacked_matmul_fused_reference, stacked_matmul_reference)

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "add_rms_norm_supports",
    "argmax_rows",
    "argmax_rows_reference",
    "lm_head_argmax",
    "lm_head_argmax_reference",
    "lm_head_argmax_supports",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "stacked_matmul",
    "stacked_matmul_fused",
    "stacked_matmul_fused_reference",
    "stacked_matmul_reference",
    "write_kv_cache",
    "write_kv_cache_reference",
]
