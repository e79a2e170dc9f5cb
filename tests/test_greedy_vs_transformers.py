"""Greedy continuations of SmolLM2 through the paged forward equal transformers' `generate`.

Expected tokens come from `golden/smollm2_greedy.json`, written by
`golden/make_smollm2_greedy.py` from transformers; two prompts are also re-checked live here so
a stale golden file cannot pass unnoticed.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import PagedRunner

GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_greedy.json").read_text())


def golden_rows(kind: str | None = None, limit: int | None = None) -> list[dict]:
    rows = [r for r in GOLDEN["rows"] if kind is None or r["kind"] == kind]
    return rows[:limit]


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def test_golden_prompts_tokenize_the_same(smollm2):
    for row in GOLDEN["rows"]:
        ids = (smollm2.tokenizer(row["prompt"])["input_ids"] if row["kind"] == "raw"
               else chat_ids(smollm2.tokenizer, row["prompt"]))
        assert ids == row["prompt_token_ids"], row["prompt"]


@pytest.mark.parametrize("row", [golden_rows("raw")[0], golden_rows("chat")[0]],
                         ids=["raw", "chat"])
def test_golden_file_matches_live_transformers(hf_smollm2, row):
    ids = row["prompt_token_ids"]
    eos = GOLDEN["meta"]["eos_token_id"]
    with torch.no_grad():
        out = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=len(row["output_token_ids"]),
                                  do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert out[0, len(ids):].tolist() == row["output_token_ids"]


def test_greedy_32_tokens_match_transformers_generate(smollm2):
    """Eight varied prompts (raw and chat-templated) decoded together through the paged cache."""
    rows = golden_rows("raw", 4) + golden_rows("chat", 4)
    prompts = [r["prompt_token_ids"] for r in rows]
    eos = GOLDEN["meta"]["eos_token_id"]
    runner = PagedRunner(smollm2, num_seqs=len(prompts), max_len=128, seed=7)
    logits = runner.step(dict(enumerate(prompts)), num_tokens=512)
    generated = {s: [int(np.argmax(logits[s][-1]))] for s in range(len(prompts))}
    for _ in range(GOLDEN["meta"]["max_new_tokens"] - 1):
        live = {s: [g[-1]] for s, g in generated.items() if g[-1] != eos}
        if not live:
            break
        for s, lg in runner.step(live).items():
            generated[s].append(int(np.argmax(lg[-1])))
    assert [generated[s] for s in range(len(prompts))] == [r["output_token_ids"] for r in rows]
