"""Model definitions. One family file covers Llama, Mistral, Qwen2 and Qwen3."""

from jaxpaged.models.llama import CausalLM, forward, rope_inv_freq, stacked_matmul_setting

__all__ = ["CausalLM", "forward", "rope_inv_freq", "stacked_matmul_setting"]
