"""Model definitions. One family file covers Llama, Mistral, Qwen2 and Qwen3."""

from jaxpaged.models.llama import CausalLM, forward, rope_inv_freq

__all__ = ["CausalLM", "forward", "rope_inv_freq"]
