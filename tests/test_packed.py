"""jaxpaged.packed: a pytree of 4-byte arrays survives the trip through one int32 buffer."""

import jax
import numpy as np
import pytest

from jaxpaged.metadata import build_step_inputs
from jaxpaged.packed import pack, unpack


def test_round_trip_keeps_dtypes_shapes_and_static_fields():
    ids, pos, md = build_step_inputs([[3, 4], [5]], [0, 7], [[1], [2]], 16, num_tokens=4,
                                     num_seqs=3, max_blocks_per_seq=2, logits_indices=[1, 2],
                                     num_logits=3, decode_only=False)
    extra = {"f": np.array([0.5, -2.0, np.inf], np.float32),
             "u": np.array([2**32 - 1, 7], np.uint32), "empty": np.zeros((3, 0), np.int32)}
    tree = (ids, pos, md, extra)
    buf, spec = pack(tree)
    assert buf.dtype == np.int32 and buf.ndim == 1
    got = jax.jit(unpack, static_argnums=1)(buf, spec)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), b)
    assert got[2].decode_only is False  # static fields ride in the spec


def test_eight_byte_dtypes_are_refused():
    with pytest.raises(ValueError, match="4-byte"):
        pack([np.zeros(2, np.int64)])
