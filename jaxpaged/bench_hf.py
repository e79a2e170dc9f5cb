"""Hugging Face transformers peers for `jaxpaged-bench --compare hf`: static batching with
`generate` (left-padded batches, each finished before the next starts) and transformers'
own continuous batching with paged attention (`generate_batch`'s manager).

The peers run in a child process (`python -m jaxpaged.bench_hf SPEC OUT`): JAX preallocates
most of the GPU memory in the parent, and torch must have the card to itself. The child never
uses jax's devices, and it runs before the parent touches them, so the two never share the card.

Counting: output tokens are the requested lengths (EOS is ignored on every side); the padded
rows static batching computes beyond a request's length are its cost, not output. Warm-up (for
`generate`, the first batch run once in full, untimed; the manager's CUDA-graph warm-up) is
timed separately and left out of the rates, as jaxpaged's warm-up is. A first batch of 64
prompts of 512 tokens took 16 s on an H100 and the same shape again 4 s (the caching
allocator grows with each new cache length, among other first-time costs): a warm-up of 2
prompts and 4 tokens, used before the tenth session, left that in the timed run.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from jaxpaged.bench_common import Workload
from jaxpaged.config import PRESETS, ModelConfig

HF_MODES = ("generate", "generate_batch")

_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def dummy_model_config(model: str | None) -> ModelConfig:
    """The architecture behind `--load-format dummy`: a preset or a directory's config.json."""
    if model is not None and os.path.isdir(model):
        return ModelConfig.from_json_file(os.path.join(model, "config.json"))
    return PRESETS[model or "smollm2-135m"]


def hf_config_dict(c: ModelConfig) -> dict[str, Any]:
    """A transformers config (`AutoConfig.for_model` arguments) of the same architecture."""
    d = dict(model_type=_MODEL_TYPES[c.family], vocab_size=c.vocab_size,
             hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
             num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
             num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
             rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
             tie_word_embeddings=c.tie_word_embeddings, attention_bias=c.attention_bias,
             bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None)
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    d["rope_parameters"] = rope
    return d


def load_hf_model(model: str | None, load_format: str, dtype: str, device: str) -> Any:
    import torch
    import transformers

    torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    if load_format == "dummy":
        d = hf_config_dict(dummy_model_config(model))
        config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        with torch.device(device):  # random init on the card: seconds, not minutes, for 8B
            hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    elif model is None:
        from jaxpaged.loader import default_model_path

        path = default_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype).to(device)
    elif str(model).endswith(".gguf"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(model)), gguf_file=os.path.basename(model),
            dtype=torch_dtype).to(device)
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device)
    return hf.eval()


def _gen_config(max_new: int, temperature: float, **extra: Any) -> Any:
    from transformers import GenerationConfig

    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
        if temperature > 0 else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new, **sample, **extra)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_static(hf: Any, work: Workload, batch_size: int, temperature: float, device: str,
               progress: bool = True, tokens: list[list[int]] | None = None) -> dict[str, Any]:
    """`generate` on left-padded batches of `batch_size`, in order, each run to its longest
    requested output (min_new_tokens = max_new_tokens: EOS ignored). A `tokens` list receives
    each request's output tokens (its requested length)."""
    import torch
    from tqdm.auto import tqdm

    pad = 0

    def batch_inputs(prompts: list[list[int]]) -> tuple[Any, Any]:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=device)
        return ids, mask

    def run_batch(lo: int) -> Any:
        prompts = work.prompts[lo:lo + batch_size]
        max_new = max(work.output_lens[lo:lo + batch_size])
        ids, mask = batch_inputs(prompts)
        out = hf.generate(ids, attention_mask=mask,
                          generation_config=_gen_config(max_new, temperature,
                                                        min_new_tokens=max_new,
                                                        pad_token_id=pad))
        _sync(device)
        return out[:, ids.shape[1]:]

    t0 = time.perf_counter()
    with torch.no_grad():
        run_batch(0)  # the first batch's shapes in full, untimed
    warmup = time.perf_counter() - t0
    computed, batch_s = 0, []
    bar = tqdm(total=len(work.prompts), desc="HF generate (static batches)", disable=not progress)
    t0 = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(work.prompts), batch_size):
            t1 = time.perf_counter()
            out = run_batch(lo)
            batch_s.append(time.perf_counter() - t1)
            computed += out.shape[0] * out.shape[1]
            if tokens is not None:
                tokens += [row[:n].tolist()
                           for row, n in zip(out, work.output_lens[lo:lo + batch_size])]
            bar.update(out.shape[0])
    elapsed = time.perf_counter() - t0
    bar.close()
    return _rates(work, elapsed) | {"warmup_s": warmup, "batch_size": batch_size,
                                    "batch_s": batch_s,
                                    "generated_tokens_incl_padding": computed}


def run_continuous(hf: Any, work: Workload, temperature: float, device: str,
                   cb_overrides: dict[str, Any] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """transformers' continuous batching (paged attention), one request per prompt with its
    own max_new_tokens; EOS disabled (-1). Timed from after the manager's warm-up."""
    from tqdm.auto import tqdm
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gen = _gen_config(max(work.output_lens), temperature, eos_token_id=-1)
    cb = ContinuousBatchingConfig(**(cb_overrides or {}))
    hints = WorkloadHints(max_prompt_length=max(len(p) for p in work.prompts),
                          max_generated_length=max(work.output_lens),
                          num_requests=len(work.prompts))
    t0 = time.perf_counter()
    with hf.continuous_batching_context_manager(generation_config=gen,
                                                continuous_batching_config=cb, block=True,
                                                timeout=30, warmup=True,
                                                workload_hints=hints) as manager:
        warmup = time.perf_counter() - t0
        bar = tqdm(total=len(work.prompts), desc="HF generate_batch (continuous)",
                   disable=not progress)
        t0 = time.perf_counter()
        for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        done, generated = 0, 0
        while done < len(work.prompts):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError(f"generate_batch stopped after {done} of "
                                       f"{len(work.prompts)} requests")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"generate_batch request failed: {result.error}")
                done += 1
                generated += len(result.generated_tokens)
                bar.update(1)
        _sync(device)
        elapsed = time.perf_counter() - t0
        bar.close()
    return _rates(work, elapsed) | {"warmup_s": warmup, "generated_tokens": generated,
                                    "cb_overrides": cb_overrides or {}}


def _rates(work: Workload, elapsed: float) -> dict[str, Any]:
    return {"num_requests": len(work.prompts), "elapsed_s": elapsed,
            "requests_per_s": len(work.prompts) / elapsed,
            "output_tokens_per_s": work.num_output_tokens / elapsed,
            "total_tokens_per_s": (work.num_prompt_tokens + work.num_output_tokens) / elapsed}


def run_peers(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the peers of `spec` in this process; each mode's failure is recorded, not raised."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Workload(spec["prompts"], spec["output_lens"])
    t0 = time.perf_counter()
    hf = load_hf_model(spec["model"], spec["load_format"], spec["dtype"], device)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "dtype": str(hf.dtype).removeprefix("torch."), "load_s": time.perf_counter() - t0,
        "attn_implementation": hf.config._attn_implementation}
    for mode in spec["modes"]:
        try:
            if mode == "generate":
                result[mode] = run_static(hf, work, spec["batch_size"], spec["temperature"],
                                          device)
            elif mode == "generate_batch":
                result[mode] = run_continuous(hf, work, spec["temperature"], device,
                                              spec.get("cb_overrides"))
            else:
                raise ValueError(f"unknown HF mode {mode!r}; allowed: {HF_MODES}")
        except Exception as e:  # one failing peer must not lose the other's numbers
            result[mode] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"HF {mode}: {_summary(result[mode])}", file=sys.stderr, flush=True)
    return result


def _summary(r: dict[str, Any]) -> str:
    if "error" in r:
        return r["error"]
    return f"{r['output_tokens_per_s']:.1f} output tok/s over {r['elapsed_s']:.1f} s"


def run_peers_subprocess(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run `run_peers(spec)` in a child process; its progress bars go to our stderr."""
    with tempfile.TemporaryDirectory(prefix="jaxpaged-bench-hf-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        try:
            proc = subprocess.run([sys.executable, "-m", "jaxpaged.bench_hf", spec_path,
                                   out_path], env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"HF peers timed out after {timeout} s"}
        if proc.returncode != 0 or not os.path.exists(out_path):
            return {"error": f"HF peer process exited with status {proc.returncode}"}
        with open(out_path) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m jaxpaged.bench_hf SPEC.json OUT.json")
    with open(argv[0]) as f:
        spec = json.load(f)
    result = run_peers(spec)
    with open(argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
