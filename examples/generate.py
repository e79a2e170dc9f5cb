"""Offline batch generation on the embedded SmolLM2-135M-Instruct: a handful of chat prompts,
completions printed, throughput reported. Run with `make run`."""

import time

from jaxpaged import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one sentence.",
    "Give me three tips for learning to program.",
    "What is 12 times 12?",
    "Name three planets of the solar system.",
]


def main() -> None:
    llm = LLM()
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=96)
    start = time.perf_counter()
    outputs = llm.chat(conversations, params)
    elapsed = time.perf_counter() - start
    for question, out in zip(QUESTIONS, outputs):
        print(f"\n### {question}\n{out.outputs[0].text.strip()}")
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(o.prompt_token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests, {num_in} prompt + {num_out} generated tokens in "
          f"{elapsed:.2f} s: {num_out / elapsed:.1f} output tokens/s, "
          f"{(num_in + num_out) / elapsed:.1f} total tokens/s")


if __name__ == "__main__":
    main()
