"""`jaxpaged-eval generate`: stream a JSONL file of prompts through the engine, appending each
result the moment its request finishes, so an interrupted run resumes where it stopped.

The plan (input rows minus those already in the results file) is made before the model is
loaded: bad input fails fast, and a finished run re-run costs nothing. Rows enter the engine a
few more than it has sequence slots for, the scheduler batches them, and results are written in
finishing order.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from tqdm.auto import tqdm

from jaxpaged.eval_data import (GenerateRow, InputError, InvalidRow, ResultWriter,
                                check_output_path, read_generate_rows, recover_output)
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine pulls in jax; bad input should fail before that
    from jaxpaged.engine import LLMEngine

_request_ids = itertools.count()


@dataclasses.dataclass(frozen=True)
class GeneratePlan:
    output: Path
    rows: list[GenerateRow]  # still to run
    invalid: list[InvalidRow]  # still to record (under --skip-invalid)
    num_input_rows: int
    num_done: int  # input rows already in the output
    num_dropped_bytes: int  # of a partial last line cut off the output

    @property
    def num_pending(self) -> int:
        return len(self.rows) + len(self.invalid)


def plan_generate(input_path: Path, output: Path, base_params: dict[str, Any],
                  skip_invalid: bool) -> GeneratePlan:
    """Validate every input row, then recover the output file; InputError on bad input."""
    if output.exists() and output.resolve() == input_path.resolve():
        raise InputError(f"--output {output} is the --input file; give a separate results file")
    check_output_path(output)
    rows, invalid = read_generate_rows(input_path, base_params, skip_invalid)
    done, dropped = recover_output(output)
    todo = [r for r in rows if r.key not in done]
    todo_invalid = [r for r in invalid if r.key not in done]
    num_input = len(rows) + len(invalid)
    return GeneratePlan(output, todo, todo_invalid, num_input,
                        num_input - len(todo) - len(todo_invalid), dropped)


def row_params(row: GenerateRow, base_params: dict[str, Any], seed: int) -> SamplingParams:
    """The row's SamplingParams. Without a seed of its own, a row samples with one derived from
    --seed and its id, so its text does not depend on which rows ran alongside it or on where
    an interrupted run resumed."""
    values = {**base_params, **row.overrides}
    if values.get("seed") in (None, -1):  # -1 is vLLM's "no seed"
        values["seed"] = zlib.crc32(f"{seed}:{row.key}".encode()) & 0x7FFFFFFF
    return SamplingParams(**values)


def chat_prompt(engine: LLMEngine, messages: list[dict[str, str]]) -> list[int]:
    tokenizer = engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError("this model has no chat template, so \"messages\" rows and --chat "
                         "cannot be used")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already holds the special tokens; tokenize without adding any.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def result_row(row: GenerateRow, out: RequestOutput) -> dict[str, Any]:
    completion = out.outputs[0]
    result: dict[str, Any] = {
        "id": row.id, "text": completion.text, "finish_reason": completion.finish_reason,
        "num_prompt_tokens": len(out.prompt_token_ids or []),
        "num_output_tokens": len(completion.token_ids)}
    if completion.stop_reason is not None:
        result["stop_reason"] = completion.stop_reason
    if out.error is not None:
        result["error"] = out.error
    if row.metadata is not None:
        result["metadata"] = row.metadata
    return result


def error_row(row_id: Any, line: int, error: str) -> dict[str, Any]:
    return {"id": row_id, "line": line, "text": "", "finish_reason": "error",
            "num_prompt_tokens": 0, "num_output_tokens": 0, "error": error}


@dataclasses.dataclass
class GenerateStats:
    written: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    elapsed: float = 0.0
    interrupted: bool = False

    def add(self, result: dict[str, Any]) -> None:
        self.written += 1
        self.prompt_tokens += result["num_prompt_tokens"]
        self.output_tokens += result["num_output_tokens"]
        self.finish_reasons[result["finish_reason"]] += 1


def run_generate(engine: LLMEngine | None, plan: GeneratePlan, base_params: dict[str, Any], *,
                 chat: bool = False, seed: int = 0, use_tqdm: bool = True) -> GenerateStats:
    """Run the plan's rows, appending each result to `plan.output` as it finishes (`engine`
    may be None when the plan has only invalid rows to record). A KeyboardInterrupt aborts
    what is left and returns with `interrupted` set; every row written so far is complete."""
    with ResultWriter(plan.output) as writer, tqdm(
            total=plan.num_pending, desc="generate", unit="req", disable=not use_tqdm,
            dynamic_ncols=True) as bar:
        run = _GenerateRun(engine, writer, bar, base_params, chat, seed)
        for bad in plan.invalid:
            run.emit(error_row(bad.id, bad.line, bad.error))
        run.run(plan.rows)
    run.stats.elapsed = time.perf_counter() - run.start
    return run.stats


class _GenerateRun:
    """One generate pass: rows go into the engine a few at a time, results come out."""

    def __init__(self, engine: LLMEngine | None, writer: ResultWriter, bar: tqdm,
                 base_params: dict[str, Any], chat: bool, seed: int):
        self.engine, self.writer, self.bar = engine, writer, bar
        self.base_params, self.chat, self.seed = base_params, chat, seed
        self.stats = GenerateStats()
        self.start = time.perf_counter()
        self.running: dict[str, GenerateRow] = {}

    def emit(self, result: dict[str, Any]) -> None:
        self.writer.write(result)
        self.stats.add(result)
        self.bar.update(1)
        rate = self.stats.output_tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.1f} out tok/s")

    def run(self, rows: list[GenerateRow]) -> None:
        # Rows wait here rather than in the scheduler's queue: a big file is not tokenized up
        # front, and the first results come out at once. Twice max_num_seqs keeps every
        # sequence slot busy as rows finish.
        waiting = iter(rows)
        limit = 2 * self.engine.max_num_seqs if rows else 0
        try:
            while True:
                while len(self.running) < limit and (row := next(waiting, None)) is not None:
                    self.submit(row)
                if not self.running:
                    break
                for out in self.engine.step():
                    if out.finished and out.request_id in self.running:
                        self.emit(result_row(self.running.pop(out.request_id), out))
        except KeyboardInterrupt:
            self.engine.abort_request(list(self.running))
            self.stats.interrupted = True

    def submit(self, row: GenerateRow) -> None:
        """Add the row's request to the engine, or write its error row if it is refused."""
        request_id = f"eval-gen-{next(_request_ids)}"
        try:
            if self.chat or row.messages:
                prompt = chat_prompt(self.engine, row.messages or [
                    {"role": "user", "content": row.prompt}])
            else:
                prompt = row.prompt
            self.engine.add_request(request_id, prompt,
                                    row_params(row, self.base_params, self.seed))
        except ValueError as e:
            self.emit(error_row(row.id, row.line, str(e)))
            return
        self.running[request_id] = row


def print_summary(plan: GeneratePlan, stats: GenerateStats, file: TextIO = sys.stdout) -> None:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.finish_reasons.items())) or "-"
    rate = stats.output_tokens / stats.elapsed if stats.elapsed else 0.0
    print(f"{'interrupted' if stats.interrupted else 'done'}: wrote {stats.written} of "
          f"{plan.num_pending} pending rows to {plan.output} ({plan.num_done} were already "
          f"there, {plan.num_input_rows} in the input)", file=file)
    print(f"finish reasons: {reasons}", file=file)
    print(f"{stats.prompt_tokens} prompt + {stats.output_tokens} output tokens in "
          f"{stats.elapsed:.1f} s: {rate:.1f} output tokens/s", file=file)
    if stats.interrupted:
        print("re-run the same command to finish the remaining rows", file=file)
