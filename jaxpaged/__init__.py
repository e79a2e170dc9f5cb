"""jaxpaged: vLLM's PagedAttention and continuous batching in JAX."""

from jaxpaged.engine import LLMEngine
from jaxpaged.engine_config import EngineConfig
from jaxpaged.llm import LLM
from jaxpaged.outputs import CompletionOutput, RequestOutput
from jaxpaged.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput"]
