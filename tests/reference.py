"""Helpers that run jaxpaged's forward step by step, for comparisons with transformers."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxpaged.attention import KVCache
from jaxpaged.metadata import build_step_inputs
from jaxpaged.models import forward

_forward = jax.jit(forward, static_argnames=("graphdef", "impl", "unroll", "stacked_matmul"),
                   donate_argnums=(2,))


class PagedRunner:
    """Feeds chunks of one or more sequences through the paged forward with shuffled blocks."""

    def __init__(self, loaded, num_seqs: int, max_len: int, block_size: int = 16, seed: int = 0,
                 impl: str = "reference", unroll: bool = False,
                 stacked_matmul: bool | None = None):
        """stacked_matmul: forward's (None reads JAXPAGED_STACKED_MATMUL when traced)."""
        cfg = loaded.config
        self.loaded, self.block_size, self.impl, self.unroll = loaded, block_size, impl, unroll
        self.stacked_matmul = stacked_matmul
        self.max_blocks = -(-max_len // block_size)
        num_blocks = num_seqs * self.max_blocks + 1  # block 0 is the null block
        perm = np.random.default_rng(seed).permutation(np.arange(1, num_blocks))
        self.tables = [list(perm[s * self.max_blocks:(s + 1) * self.max_blocks])
                       for s in range(num_seqs)]
        self.cache = KVCache.zeros(cfg.num_hidden_layers, num_blocks, block_size,
                                   cfg.num_key_value_heads, cfg.head_dim, loaded.dtype)
        self.lens = [0] * num_seqs

    def step(self, chunks: dict[int, list[int]], num_tokens: int = 64) -> dict[int, np.ndarray]:
        """Feed `chunks[s]` to sequence s; return f32[len(chunk), V] logits per sequence."""
        seqs = sorted(chunks)
        token_ids = [chunks[s] for s in seqs]
        rows = list(range(sum(len(t) for t in token_ids)))
        # A decode-only step pads tokens to the sequence count, as the runner does.
        decode_only = all(len(t) == 1 for t in token_ids)
        if decode_only:
            num_tokens = len(self.tables)
        ids, pos, md = build_step_inputs(
            token_ids, [self.lens[s] for s in seqs], [self.tables[s] for s in seqs],
            self.block_size, num_tokens=max(num_tokens, len(rows)), num_seqs=len(self.tables),
            max_blocks_per_seq=self.max_blocks, logits_indices=rows,
            num_logits=max(num_tokens, len(rows)), decode_only=decode_only)
        md = jax.tree.map(jnp.asarray, md)
        self.cache, logits = _forward(self.loaded.graphdef, self.loaded.params, self.cache,
                                      jnp.asarray(ids), jnp.asarray(pos), md, self.impl,
                                      unroll=self.unroll, stacked_matmul=self.stacked_matmul)
        logits = np.asarray(logits)
        out, lo = {}, 0
        for s, t in zip(seqs, token_ids):
            out[s] = logits[lo:lo + len(t)]
            lo += len(t)
            self.lens[s] += len(t)
        return out


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def first_layers(loaded, num_layers: int):
    """The model `loaded` cut to its first `num_layers` decoder layers (embedding, final norm
    and head kept): a real model's weights at a fraction of the depth, for tests of how the
    engine wires its kernels, which a few layers show as well as all of them."""
    import dataclasses

    from jaxpaged.weights import flatten_state, to_state

    config = dataclasses.replace(loaded.config, num_hidden_layers=num_layers)
    flat = {path: (leaf[:num_layers] if path[0] == "layers" else leaf)
            for path, leaf in flatten_state(loaded.params).items()}
    graphdef, params = to_state(config, flat, loaded.dtype)
    return dataclasses.replace(loaded, config=config, graphdef=graphdef, params=params)


def hf_first_layers(model, num_layers: int):
    """transformers' `model` cut the same way as `first_layers` (a new model: `model` is kept)."""
    import copy

    import torch

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    cut = type(model)(config).to(model.dtype).eval()
    missing, _ = cut.load_state_dict(model.state_dict(), strict=False)  # drops layers >= n
    if missing:
        raise ValueError(f"the cut model lacks {missing}")
    with torch.no_grad():  # a tied head: the copied embedding is the head's weight too
        cut.tie_weights()
    return cut


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos: int) -> list[list[int]]:
    """transformers' greedy `generate` for each prompt (token ids), as the golden file's script
    runs it."""
    import torch

    outs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos)
        outs.append(out[0, len(ids):].tolist())
    return outs
