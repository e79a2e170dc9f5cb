"""GGUF files of each family: a tiny transformers model written the way llama.cpp's converter
writes it (names, Llama's q/k row permutation, f32 and quantized tensors) loads back into
jaxpaged with the same logits."""

import jax
import numpy as np
import pytest
import torch

from reference import PagedRunner, rel_err
from test_models import _tiny_hf_model, hf_logits

_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: rotate-half rows -> interleaved rows, per head."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model, arch: str, path, rope_freqs: np.ndarray | None = None) -> None:
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(3)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            out = f"blk.{layer}.{_HF_TO_GGUF[rest]}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                w = _permute(w, cfg.num_attention_heads)
            elif arch == "llama" and rest == "self_attn.k_proj.weight":
                w = _permute(w, cfg.num_key_value_heads)
        if w.ndim == 2 and out.endswith("ffn_up.weight"):
            # One quantized tensor per file exercises dequantization (ggml Q8_0).
            writer.add_tensor(out, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            model.state_dict()[name].copy_(torch.from_numpy(
                gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                       gguf.GGMLQuantizationType.Q8_0)))
        else:
            writer.add_tensor(out, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family,arch,extra", [
    ("llama", "llama", {}), ("qwen2", "qwen2", {}), ("qwen3", "qwen3", {"head_dim": 32})])
def test_tiny_gguf_matches_transformers(family, arch, extra, tmp_path, monkeypatch):
    from jaxpaged.loader import load_model

    monkeypatch.setenv("JAXPAGED_CACHE_DIR", str(tmp_path / "cache"))
    hf = _tiny_hf_model(family, tmp_path / "hf", intermediate_size=128, **extra)
    write_gguf(hf, arch, tmp_path / f"tiny-{family}.gguf")
    ours = load_model(str(tmp_path / f"tiny-{family}.gguf"), dtype="float32")
    assert ours.config.family == family and ours.config.eos_token_ids == (3,)
    ids = list(np.random.default_rng(4).integers(0, 160, size=40))
    runner = PagedRunner(ours, num_seqs=1, max_len=64, seed=1)
    got = np.concatenate([runner.step({0: ids[:30]})[0]] +
                         [runner.step({0: [t]})[0] for t in ids[30:]])
    assert rel_err(got, hf_logits(hf, ids)) <= 1e-4


def test_llama3_rope_scaling_travels_as_rope_freqs(tmp_path, monkeypatch):
    """Llama 3.1 GGUFs carry their RoPE scaling as per-frequency divisors (`rope_freqs`)."""
    import dataclasses

    from jaxpaged.config import ModelConfig
    from jaxpaged.loader import load_model
    from jaxpaged.models import rope_inv_freq

    monkeypatch.setenv("JAXPAGED_CACHE_DIR", str(tmp_path / "cache"))
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    hf = _tiny_hf_model("llama", tmp_path / "hf", rope_scaling=scaling, rope_theta=500000.0)
    scaled = ModelConfig.from_json_file(tmp_path / "hf" / "config.json")
    plain = dataclasses.replace(scaled, rope_scaling=None)
    write_gguf(hf, "llama", tmp_path / "l3.gguf",
               rope_freqs=rope_inv_freq(plain) / rope_inv_freq(scaled))
    ours = load_model(str(tmp_path / "l3.gguf"), dtype="float32")
    assert ours.config.rope_freq_factors is not None
    ids = list(np.random.default_rng(5).integers(0, 160, size=60))
    runner = PagedRunner(ours, num_seqs=1, max_len=64, seed=2)
    got = np.concatenate([runner.step({0: ids[:40]})[0]] +
                         [runner.step({0: [t]})[0] for t in ids[40:]])
    assert rel_err(got, hf_logits(hf, ids)) <= 1e-4


def test_weight_cache_is_keyed_by_file_content(tmp_path, monkeypatch):
    """A GGUF copied elsewhere (a reinstall, another venv) reuses its converted entry; a file
    with other weights gets its own."""
    import os
    import shutil

    from jaxpaged.loader import load_model

    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXPAGED_CACHE_DIR", str(cache))
    hf = _tiny_hf_model("llama", tmp_path / "hf")
    first = tmp_path / "a" / "tiny.gguf"
    first.parent.mkdir()
    write_gguf(hf, "llama", first)
    a = load_model(str(first), dtype="float32")
    copy = tmp_path / "b" / "tiny.gguf"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    os.utime(copy, ns=(1, 1))
    b = load_model(str(copy), dtype="float32")
    assert len(list(cache.iterdir())) == 1
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    with torch.no_grad():
        hf.model.embed_tokens.weight.add_(1.0)
    other = tmp_path / "c" / "tiny.gguf"
    other.parent.mkdir()
    write_gguf(hf, "llama", other)
    load_model(str(other), dtype="float32")
    assert len(list(cache.iterdir())) == 2
