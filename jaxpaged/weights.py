"""Checkpoint tensors in Hugging Face naming -> the model's NNX parameter tree.

Every loader (safetensors directory, GGUF file) produces tensors under Hugging Face's names
and layouts (`[out, in]` linear weights); this module stacks the per-layer tensors on the
leading layer axis, transposes linear weights to `[in, out]` and casts them.
"""

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import Mesh, NamedSharding

from jaxpaged.config import ModelConfig
from jaxpaged.models import CausalLM
from jaxpaged.sharding import TP_AXIS, param_shardings, param_spec


def abstract_model(config: ModelConfig, dtype: jnp.dtype) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: CausalLM(config, dtype, nnx.Rngs(0))))


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Our parameter path -> (HF tensor name with `{i}` for the layer, transpose?)."""
    *module, leaf = path
    suffix = "bias" if leaf == "bias" else "weight"
    if module[0] == "lm_head":
        return f"lm_head.{suffix}", leaf == "kernel"
    if module[0] == "layers":
        module = ["layers", "{i}", *module[1:]]
    return "model." + ".".join([*module, suffix]), leaf == "kernel"


def params_from_tensors(config: ModelConfig, get: Callable[[str], np.ndarray],
                        dtype: jnp.dtype, source: str) -> dict[str, Any]:
    """Build the pure parameter dict; `get(name)` returns a tensor or raises KeyError."""
    _, abstract = abstract_model(config, dtype)
    flat = {}
    for path, leaf in nnx.to_flat_state(abstract):
        path = tuple(str(p) for p in path)
        name, transpose = _hf_name(path)

        def load(n: str) -> np.ndarray:
            try:
                t = np.asarray(get(n))
            except KeyError:
                raise ValueError(f"{source}: tensor {n!r} is missing from the checkpoint") from None
            return t.T if transpose else t

        if "{i}" in name:
            arr = np.stack([load(name.format(i=i)) for i in range(config.num_hidden_layers)])
        else:
            arr = load(name)
        if arr.shape != leaf.get_value().shape:
            raise ValueError(f"{source}: tensor {name!r} has shape {arr.shape}, "
                             f"expected {leaf.get_value().shape}")
        flat[path] = arr
    return flat


def to_state(config: ModelConfig, flat: Mapping[tuple[str, ...], np.ndarray],
             dtype: jnp.dtype, mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Host tensors -> device parameters. With a mesh each tensor goes from the host straight
    to its shards, so no device ever holds the whole model."""
    graphdef, state = abstract_model(config, dtype)
    pure = nnx.to_pure_dict(state)
    for path, arr in flat.items():
        node = pure
        for key in path[:-1]:
            node = node[key]
        if mesh is None:
            node[path[-1]] = jnp.asarray(arr, dtype=dtype)
        else:
            spec = param_spec(path, arr.shape, mesh.shape[TP_AXIS])
            node[path[-1]] = jax.device_put(np.asarray(arr).astype(dtype),
                                            NamedSharding(mesh, spec))
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def random_state(config: ModelConfig, dtype: jnp.dtype, seed: int = 0,
                 mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights in the model's shapes, made on the device (vLLM's --load-format dummy);
    with a mesh, made in place on their shards (the same values)."""
    graphdef, abstract = abstract_model(config, dtype)

    def init(key: jax.Array) -> nnx.State:
        return nnx.split(CausalLM(config, dtype, nnx.Rngs(key)))[1]

    shardings = {} if mesh is None else {"out_shardings": param_shardings(abstract, mesh)}
    return graphdef, jax.jit(init, **shardings)(jax.random.key(seed))


def flatten_state(state: nnx.State) -> dict[tuple[str, ...], np.ndarray]:
    return {tuple(str(p) for p in path): np.asarray(leaf.get_value())
            for path, leaf in nnx.to_flat_state(state)}


def read_safetensors_dir(path: Path) -> Callable[[str], np.ndarray]:
    """A lazy tensor getter over every `*.safetensors` file of a directory."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files (a Hugging Face model directory needs "
                         f"config.json and its weights as safetensors)")
    where: dict[str, Any] = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="flax")
            for name in handle.keys():
                where[name] = handle
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from e

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise KeyError(name)
        return np.asarray(where[name].get_tensor(name))

    return get
