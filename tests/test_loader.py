"""Loading: presets, dummy weights, the embedded model's cache, and clear errors for bad input."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpaged.config import PRESETS, ModelConfig
from jaxpaged.loader import load_model
from jaxpaged.weights import abstract_model


@pytest.mark.parametrize("name,billions", [("llama-3.2-1b", 1.24), ("llama-3.1-8b", 8.03),
                                           ("qwen3-0.6b", 0.60), ("smollm2-135m", 0.135),
                                           ("llama-3.1-70b", 70.6)])
def test_presets_have_the_published_sizes(name, billions):
    _, state = abstract_model(PRESETS[name], jnp.bfloat16)
    count = sum(int(np.prod(leaf.get_value().shape)) for _, leaf in nnx.to_flat_state(state))
    assert count == PRESETS[name].num_params
    assert count / 1e9 == pytest.approx(billions, rel=0.02)


def test_dummy_weights_run_in_the_presets_shapes():
    loaded = load_model("smollm2-135m", load_format="dummy", dtype="float32")
    assert loaded.tokenizer is None
    emb = loaded.params["embed_tokens"]["embedding"].get_value()
    assert emb.shape == (49152, 576) and float(jnp.std(emb)) > 0


def _write_config(path, **overrides):
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
              "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "rms_norm_eps": 1e-6}
    config.update(overrides)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    _write_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_model(str(tmp_path))


def test_missing_weights_name_the_directory(tmp_path):
    _write_config(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}.*safetensors"):
        load_model(str(tmp_path))


def test_corrupt_safetensors_names_the_file(tmp_path):
    _write_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(tmp_path))


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import save_file

    _write_config(tmp_path)
    save_file({"model.embed_tokens.weight": np.zeros((32, 16), np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.input_layernorm.weight"):
        load_model(str(tmp_path))


def test_corrupt_gguf_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ValueError, match="broken.gguf"):
        load_model(str(bad))


def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        load_model("no-such-model")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        load_model("qwen3-0.6b")


def test_bad_dtype_and_load_format_are_named():
    with pytest.raises(ValueError, match="dtype='int8'"):
        load_model(None, dtype="int8")
    with pytest.raises(ValueError, match="load_format='pt'"):
        load_model(None, load_format="pt")


def test_model_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_key_value_heads=4"):
        ModelConfig(family="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
                    num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=4,
                    head_dim=4)
