"""Model architecture config and the named shape presets used with dummy weights.

Engine settings (block size, batch limits) live in `jaxpaged.engine_config`; this file only
describes a network's shapes, so a checkpoint's `config.json`, a GGUF header and a preset
all land in the same `ModelConfig`.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    # Hugging Face `architectures[0]` -> family name used in presets and GGUF headers.
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's frequency-dependent RoPE rescaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int
    num_hidden_layers: int  # L
    num_attention_heads: int  # N
    num_key_value_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    qk_norm: bool = False  # Qwen3 normalises q and k per head
    # llama.cpp's per-frequency RoPE divisors (a GGUF's `rope_freqs` tensor, how Llama 3.1
    # scaling travels in GGUF files); applied instead of rope_scaling.
    rope_freq_factors: tuple[float, ...] | None = None
    # Mistral-style local attention; the engine caps max_model_len here instead of windowing.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        families = sorted(set(SUPPORTED_ARCHITECTURES.values()))
        if self.family not in families:
            raise ValueError(f"family={self.family!r} is not supported; supported: {families}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def num_params(self) -> int:
        D, F, N, K, H = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         self.num_key_value_heads, self.head_dim)
        layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D
        layer += (N + 2 * K) * H if self.attention_bias else 0
        layer += 2 * H if self.qk_norm else 0
        embed = self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + D

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = config.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: architecture {arch!r} is not supported; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[arch]
        scaling = config.get("rope_scaling") or config.get("rope_parameters")
        rope_theta = config.get("rope_theta")
        if rope_theta is None and isinstance(scaling, dict):
            rope_theta = scaling.get("rope_theta")
        rope = None
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "llama3":
            rope = RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                               float(scaling["high_freq_factor"]),
                               int(scaling["original_max_position_embeddings"]))
        elif isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (
                None, "default"):
            raise ValueError(f"{source}: rope scaling {scaling!r} is not supported "
                             f"(supported: default, llama3)")
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        N = config["num_attention_heads"]
        return cls(
            family=family,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=N,
            num_key_value_heads=config.get("num_key_value_heads") or N,
            head_dim=config.get("head_dim") or config["hidden_size"] // N,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            sliding_window=(config.get("sliding_window")
                            if config.get("use_sliding_window", family == "mistral") else None),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json_file(cls, path: Path) -> "ModelConfig":
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read model config {path}: {e}") from e
        return cls.from_hf_config(config, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        if d.get("rope_freq_factors") is not None:
            d["rope_freq_factors"] = tuple(d["rope_freq_factors"])
        return cls(**d)


_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

# Real model shapes for benchmarking with random weights (vLLM's --load-format dummy).
PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_ids=(2,)),
    "llama-3.2-1b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0, **_LLAMA3_ROPE),
        max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-8b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0, **_LLAMA3_ROPE),
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-70b": ModelConfig(
        family="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0, **_LLAMA3_ROPE),
        max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009)),
    "qwen3-0.6b": ModelConfig(
        family="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_word_embeddings=True, qk_norm=True, bos_token_id=None, eos_token_ids=(151645,)),
}
