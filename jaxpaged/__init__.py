"""jaxpaged: vLLM's PagedAttention and continuous batching in JAX."""

__version__ = "0.1.0"
