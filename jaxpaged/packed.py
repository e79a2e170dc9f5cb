"""One host-to-device transfer per jitted call: a pytree of small 4-byte arrays (int32, uint32,
float32) travels as one flat int32 buffer plus a static spec, and is cut apart inside jit.

A step's inputs are ~8 arrays for the forward and ~12 for the sampler; passing them one by one
costs a transfer and argument handling each (~1 ms of host time a step on an H100 machine).
"""

import math

import jax
import numpy as np

# (treedef, ((dtype, shape), ...)): static, hashable, part of the compiled program's key. The
# np.dtype itself, not its name: `dtype.name` is computed in Python on each access (~20 us).
Spec = tuple


def pack(tree) -> tuple[np.ndarray, Spec]:
    """Host side: `tree`'s leaves (NumPy, 4-byte dtypes) -> (int32 buffer, spec)."""
    leaves, treedef = jax.tree.flatten(tree)
    parts, layout = [], []
    for leaf in leaves:
        a = np.asarray(leaf)
        if a.dtype.itemsize != 4:
            raise ValueError(f"pack takes 4-byte dtypes, got {a.dtype}")
        parts.append(np.ascontiguousarray(a).reshape(-1).view(np.int32))
        layout.append((a.dtype, a.shape))
    buf = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return buf, (treedef, tuple(layout))


def unpack(buf: jax.Array, spec: Spec):
    """Inside jit: the tree `pack` took apart, with its dtypes and shapes."""
    treedef, layout = spec
    leaves, offset = [], 0
    for dtype, shape in layout:
        size = math.prod(shape)
        x = buf[offset:offset + size].reshape(shape)
        offset += size
        if dtype != np.int32:
            x = jax.lax.bitcast_convert_type(x, dtype)
        leaves.append(x)
    return jax.tree.unflatten(treedef, leaves)
