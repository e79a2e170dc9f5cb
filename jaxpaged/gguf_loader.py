"""GGUF files (llama.cpp's format) of the Llama, Mistral, Qwen2 and Qwen3 families.

Tensors are dequantized with the `gguf` package and renamed to Hugging Face's names; llama.cpp
permutes the rows of Llama's q/k projections for its interleaved RoPE, which is undone here.
"""

from pathlib import Path
from typing import Any

import numpy as np

from jaxpaged.config import ModelConfig

GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on garbage
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (interleaved -> rotate-half rotary layout)."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """-> (config, tensors under Hugging Face names as f32, tokenizer metadata)."""
    from gguf import quants

    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                         f"{sorted(GGUF_ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    num_kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", num_heads))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    config = ModelConfig(
        family=GGUF_ARCHITECTURES[arch],
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        rope_freq_factors=(None if freqs is None else tuple(
            float(f) for f in quants.dequantize(freqs.data, freqs.tensor_type).reshape(-1))),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into the config above
        if t.name in _GLOBAL_TENSORS:
            hf = _GLOBAL_TENSORS[t.name]
        else:
            _, layer, rest = t.name.split(".", 2)
            if rest not in _LAYER_TENSORS:
                raise ValueError(f"{path}: unexpected tensor {t.name!r}")
            hf = f"model.layers.{layer}.{_LAYER_TENSORS[rest]}"
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if arch == "llama" and rest_is(t.name, "attn_q.weight"):
            w = _unpermute(w, num_heads)
        elif arch == "llama" and rest_is(t.name, "attn_k.weight"):
            w = _unpermute(w, num_kv_heads)
        tensors[hf] = w
    tokenizer_meta = {"chat_template": _field(reader, "tokenizer.chat_template"),
                      "eos_token_id": eos, "bos_token_id": config.bos_token_id}
    return config, tensors, tokenizer_meta


def rest_is(name: str, suffix: str) -> bool:
    return name.startswith("blk.") and name.endswith("." + suffix)
