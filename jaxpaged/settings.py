"""Settings read from the environment that several modules share."""

import os

import jax


def on_for_gpu(name: str) -> bool:
    """An on/off environment switch whose default follows the backend: `name`="1" or "0"
    forces it; unset, it is on where JAX's default backend is a GPU."""
    setting = os.environ.get(name)
    if setting is None:
        return jax.default_backend() == "gpu"
    if setting not in ("0", "1"):
        raise ValueError(f"{name}={setting!r}; allowed: 0, 1 (unset: on for a GPU)")
    return setting == "1"
