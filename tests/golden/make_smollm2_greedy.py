"""Regenerate `smollm2_greedy.json`: transformers' greedy `generate` on the embedded SmolLM2.

Run: `.venv/bin/python tests/golden/make_smollm2_greedy.py`. The tests compare jaxpaged's
greedy tokens to this file (and re-check a few prompts live against transformers), so the slow
PyTorch generation runs once instead of in every test session.
"""

import json
from pathlib import Path

import torch
import transformers

from jaxpaged.loader import default_model_path

NEW_TOKENS = 32
EOS = 2  # the GGUF metadata's EOS, <|im_end|>; transformers reports <|im_start|>
RAW = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "import numpy as np\n\ndef softmax(x):",
    "The three primary colors are",
    "1, 1, 2, 3, 5, 8, 13,",
    "Dear hiring manager, I am writing to apply for the position of",
    "The mitochondria is",
    "Here is a short story about a robot who learns to paint. It begins in a quiet workshop on "
    "the edge of a city, where an old inventor keeps a room full of half-finished machines.",
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined a screw press, movable metal type, oil-based ink and paper into a "
    "system that could produce books far faster than scribes. Within fifty years presses had "
    "spread to more than two hundred cities across Europe, and the number of books in "
    "circulation grew from thousands to millions. Scholars could now compare identical copies "
    "of a text, errors could be corrected in later editions, and ideas travelled faster than "
    "ever before. The most important consequence of this change was",
]
CHAT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "How many legs does a spider have?",
    "Give me a tip for learning to program.",
    "What is 12 times 12?",
]


def main() -> None:
    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rows = []
    for kind, prompts in (("raw", RAW), ("chat", CHAT)):
        for prompt in prompts:
            if kind == "raw":
                ids = tok(prompt)["input_ids"]
            else:
                ids = list(tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                   add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
            rows.append({"kind": kind, "prompt": prompt, "prompt_token_ids": ids,
                         "output_token_ids": out[0, len(ids):].tolist()})
            print(kind, repr(tok.decode(rows[-1]["output_token_ids"])))
    meta = {"model": path.name, "transformers": transformers.__version__,
            "max_new_tokens": NEW_TOKENS, "eos_token_id": EOS, "dtype": "float32"}
    out_file = Path(__file__).with_name("smollm2_greedy.json")
    out_file.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
