"""Engine settings, validated at construction. Architecture lives in `jaxpaged.config`."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "auto"  # bf16 on GPUs, f32 on the CPU
    load_format: str = "auto"  # "dummy": random weights in the model's shapes
    block_size: int = 16
    # None picks per platform: the CPU's reference attention gathers whole block tables, so
    # its defaults are far smaller than the GPU's.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_fraction
    kv_cache_memory_fraction: float = 0.9  # of device memory left after the weights
    enable_prefix_caching: bool = True
    seed: int = 0
    warmup: bool = True
    attention_impl: str = "auto"  # "reference" | "pallas" | "auto" (pallas on GPU)
    tensor_parallel_size: int = 1  # devices the weights and KV heads are split over
    # Plan and dispatch step N + 1 while step N runs (vLLM's --async-scheduling).
    async_scheduling: bool = True
    # Decode steps one scheduler output may cover (vLLM's --num-scheduler-steps): > 1 runs
    # that many decode steps in one device program when the batch allows (jaxpaged.scheduler).
    # None picks per platform: 4 on a GPU, 1 on the CPU (LLMEngine.num_scheduler_steps).
    num_scheduler_steps: int | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size={self.block_size} must be a power of two >= 1")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int or None")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be >= 2 (block 0 is "
                             f"reserved)")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError(f"kv_cache_memory_fraction={self.kv_cache_memory_fraction} must be "
                             f"in (0, 1]")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size!r} must be a "
                             f"positive int")
        if self.num_scheduler_steps is not None and (
                not isinstance(self.num_scheduler_steps, int) or self.num_scheduler_steps < 1):
            raise ValueError(f"num_scheduler_steps={self.num_scheduler_steps!r} must be a "
                             f"positive int or None")
        if self.attention_impl not in ("auto", "reference", "pallas"):
            raise ValueError(f"attention_impl={self.attention_impl!r}; allowed: auto, reference, "
                             f"pallas")
