"""`LLM`: vLLM's offline API. `LLM(...).generate(prompts, sampling_params)` runs every prompt
through the continuous-batching engine and returns one `RequestOutput` per prompt, in order."""

import itertools
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from jaxpaged.engine import LLMEngine
from jaxpaged.engine_config import EngineConfig
from jaxpaged.outputs import RequestMetrics, RequestOutput
from jaxpaged.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto",
                 load_format: str = "auto", block_size: int = 16,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                 max_model_len: int | None = None, num_kv_blocks: int | None = None,
                 kv_cache_memory_fraction: float = 0.9, enable_prefix_caching: bool = True,
                 seed: int = 0, warmup: bool = True, attention_impl: str = "auto",
                 tensor_parallel_size: int = 1, async_scheduling: bool = True,
                 num_scheduler_steps: int | None = None):
        config = EngineConfig(
            model=model, dtype=dtype, load_format=load_format, block_size=block_size,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len, num_kv_blocks=num_kv_blocks,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            enable_prefix_caching=enable_prefix_caching, seed=seed, warmup=warmup,
            attention_impl=attention_impl, tensor_parallel_size=tensor_parallel_size,
            async_scheduling=async_scheduling, num_scheduler_steps=num_scheduler_steps)
        self.llm_engine = LLMEngine(config)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None
                 = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; a prompt or sampling parameters that fail validation
        give that prompt a finished output with finish_reason "error" and the reason in
        `RequestOutput.error`, and the others run as usual."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, (SamplingParams, dict)):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} "
                                 f"prompts; give one, or one per prompt")
        results: dict[str, RequestOutput] = {}
        order = []
        for prompt, params in zip(prompts, params_list):
            request_id = str(next(self._counter))
            order.append(request_id)
            try:
                if isinstance(params, dict):
                    params = SamplingParams(**params)
                self.llm_engine.add_request(request_id, prompt, params,
                                            output_kind="final_only")
            except (ValueError, TypeError) as e:
                now = time.time()
                results[request_id] = RequestOutput.from_error(
                    request_id, str(e), prompt if isinstance(prompt, str) else None,
                    prompt if isinstance(prompt, list) else None,
                    RequestMetrics(arrival_time=now, last_token_time=now, finished_time=now))
        self._run_engine(results, use_tqdm)
        return [results[r] for r in order]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None or not tokenizer.chat_template:
            raise ValueError("this model has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False) for c in conversations]
        # The template already holds the special tokens; tokenize without adding any.
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outputs = self.generate(ids, sampling_params, use_tqdm)
        for out, text in zip(outputs, prompts):
            out.prompt = text
        return outputs

    def _run_engine(self, results: dict[str, RequestOutput], use_tqdm: bool) -> None:
        engine = self.llm_engine
        total = engine.get_num_unfinished_requests()
        bar = tqdm(total=total, desc="Processed prompts", disable=not use_tqdm,
                   dynamic_ncols=True)
        start, out_tokens = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    results[output.request_id] = output
                    out_tokens += sum(len(c.token_ids) for c in output.outputs)
                    bar.update(1)
                    bar.set_postfix_str(
                        f"output: {out_tokens / (time.perf_counter() - start):.1f} toks/s")
        bar.close()
