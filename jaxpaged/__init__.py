"""jaxpaged: vLLM's PagedAttention and continuous batching in JAX.

Exports resolve lazily, so importing a host-side module (`jaxpaged.scheduler`, ...) never
pulls in jax.
"""

import importlib

from jaxpaged import logger as _logger
from jaxpaged import xla_flags as _xla_flags

_logger.configure()
_xla_flags.apply_default_xla_flags()  # before JAX creates a backend (see jaxpaged.xla_flags)

__version__ = "0.1.0"
_EXPORTS = {
    "LLM": "jaxpaged.llm",
    "LLMEngine": "jaxpaged.engine",
    "EngineConfig": "jaxpaged.engine_config",
    "SamplingParams": "jaxpaged.sampling_params",
    "RequestOutput": "jaxpaged.outputs",
    "CompletionOutput": "jaxpaged.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxpaged' has no attribute {name!r}")
