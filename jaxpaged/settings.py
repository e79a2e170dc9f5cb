"""Settings read from the environment that several modules share."""

import os
from collections.abc import Callable

import jax


def switch(name: str, default: bool | Callable[[], bool], unset: str = "") -> bool:
    """An on/off environment switch: `name`="1" or "0", `default` when unset (a callable is
    asked only then); any other value is an error naming the variable (`unset` describes the
    default in that message)."""
    setting = os.environ.get(name)
    if setting is None:
        return default() if callable(default) else default
    if setting not in ("0", "1"):
        raise ValueError(f"{name}={setting!r}; allowed: 0, 1{unset}")
    return setting == "1"


def on_for_gpu(name: str) -> bool:
    """An on/off environment switch whose default follows the backend: `name`="1" or "0"
    forces it; unset, it is on where JAX's default backend is a GPU (the backend is asked only
    then)."""
    return switch(name, lambda: jax.default_backend() == "gpu", " (unset: on for a GPU)")
