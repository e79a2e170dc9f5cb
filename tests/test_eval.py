"""`jaxpaged-eval`: log-likelihoods and strided perplexity equal transformers' on SmolLM2,
generate resumes after a SIGKILL with every id exactly once, and bad input stops with a clear
message (exit status 2) before anything is written.

One engine serves the module; the CLI runs use the same limits so they reuse its compiled
shapes.
"""

import contextlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jaxpaged.eval import main
from jaxpaged.eval_data import (InputError, read_generate_rows, read_loglikelihood_rows,
                                recover_output)
from jaxpaged.eval_generate import plan_generate, run_generate
from jaxpaged.eval_score import (encode_pair, loglikelihood, perplexity, score_continuations,
                                 strided_windows)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
LIMITS = {"max_model_len": 256, "max_num_seqs": 4, "max_num_batched_tokens": 64,
          "num_kv_blocks": 65}
MODEL_FLAGS = ["--dtype", "float32", "--no-warmup", "--no-progress"] + [
    a for k, v in LIMITS.items() for a in (f"--{k.replace('_', '-')}", str(v))]
PAIRS = [("Question: What is the capital of France?\nAnswer:", " Paris"),
         ("Question: What is the capital of France?\nAnswer: ", "Berlin is the capital"),
         ("The quick brown fox jumps over the lazy", " dog"),
         ("", "Hello world"),
         ("1, 2, 3, 4,", " 5, 6, 7")]


@pytest.fixture(scope="module")
def engine(smollm2):
    from jaxpaged import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(dtype="float32", warmup=False, **LIMITS), loaded=smollm2)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_ids(path: Path) -> list:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


# -- scoring vs transformers --------------------------------------------------------------


@contextlib.contextmanager
def one_torch_thread():
    """On 2 shared cores torch's intra-op threads fight XLA's and run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), one_torch_thread():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)  # (T, V): row t scores token t + 1


def test_encode_pair_moves_context_spaces_to_the_continuation(smollm2):
    tok = smollm2.tokenizer
    ctx, cont = encode_pair(tok, "Answer: ", "Paris")
    assert (ctx, cont) == encode_pair(tok, "Answer:", " Paris")
    assert ctx == tok("Answer:")["input_ids"] and cont == tok(" Paris")["input_ids"]
    assert encode_pair(tok, "", "Hello") == ([tok.bos_token_id], tok("Hello")["input_ids"])


def test_loglikelihoods_match_transformers(engine, hf_smollm2):
    scores = score_continuations(engine, [p for p in PAIRS], use_tqdm=False)
    for (context, continuation), score in zip(PAIRS, scores):
        ctx, cont = encode_pair(engine.tokenizer, context, continuation)
        lp = hf_logprobs(hf_smollm2, ctx + cont)
        targets = range(len(ctx), len(ctx) + len(cont))
        expected = sum(lp[t - 1, (ctx + cont)[t]].item() for t in targets)
        greedy = all(lp[t - 1].argmax().item() == (ctx + cont)[t] for t in targets)
        assert score.error is None and score.num_tokens == len(cont)
        assert abs(score.logprob - expected) < 1e-3, (context, continuation)
        assert score.is_greedy == greedy


def test_loglikelihood_rows_pick_the_likeliest_and_grade(engine, tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [
        {"id": 1, "context": "The capital of France is", "continuations": [" Paris", " a banana"],
         "answer": " Paris"},
        {"id": 2, "context": "One, two, three,", "continuations": [" purple", " four"],
         "answer": 0},
        {"id": 3, "context": "x", "continuations": [" y" * 300]}])
    results = loglikelihood(engine, read_loglikelihood_rows(path), use_tqdm=False)
    assert [r.get("correct") for r in results] == [True, False, None]
    assert results[1]["prediction"] == 1 and "max_model_len=256" in results[2]["error"]


def hf_strided_perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """The Hugging Face perplexity guide's loop (labels masked to -100, the model's mean loss),
    except that it counts the scored tokens exactly: the guide's `num_valid - batch_size` is
    one short for every window after the first, whose first label is not the one dropped by
    the shift."""
    input_ids = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg_len = end - prev_end
        window_ids = input_ids[:, begin:end]
        target_ids = window_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad(), one_torch_thread():
            loss = model(window_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / n_tokens)


def test_perplexity_matches_transformers_strided(engine, hf_smollm2):
    ids = engine.tokenizer((DATA / "text.txt").read_text())["input_ids"][:300]
    result = perplexity(engine, ids, window=64, stride=24, use_tqdm=False)
    expected = hf_strided_perplexity(hf_smollm2, ids, 64, 24)
    assert result.num_scored == len(ids) - 1
    assert abs(result.perplexity - expected) / expected < 1e-3


@pytest.mark.parametrize("n, window, stride", [(300, 100, 48), (10, 4, 4), (7, 16, 3),
                                               (50, 8, 1)])
def test_strided_windows_score_each_token_once_with_bounded_context(n, window, stride):
    windows = strided_windows(n, window, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    # With stride == window no context carries over, so each window's first token goes unscored.
    assert scored == [t for t in range(1, n) if window > stride or t % stride]
    assert all(w.end - w.begin <= window and w.begin < w.first_scored for w in windows)
    later = windows[1:] if window > stride else []
    assert all(w.first_scored - w.begin >= window - stride for w in later)


# -- generate: streaming, resume after SIGKILL, invalid rows ------------------------------


def test_generate_resumes_after_sigkill_with_every_id_once(engine, tmp_path):
    rows = [{"id": f"r{i:02d}", "prompt": f"Count from {i} upwards:"} for i in range(12)]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    argv = ["generate", "--input", str(inp), "--output", str(out), "--max-tokens", "12",
            "--ignore-eos"] + MODEL_FLAGS
    proc = subprocess.Popen([sys.executable, "-m", "jaxpaged.eval"] + argv, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out.exists() and out.read_bytes().count(b"\n")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the CLI wrote nothing in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    first = read_ids(out)
    assert 0 < len(first) < len(rows)
    missing = next(r["id"] for r in rows if r["id"] not in first)
    with open(out, "ab") as f:  # a torn last line, as a kill in the middle of a write leaves
        f.write(b'{"id": "%s", "text": "Count' % missing.encode())
    assert main(argv) == 0
    ids = read_ids(out)
    assert sorted(ids) == [r["id"] for r in rows] and ids[:len(first)] == first
    assert all(json.loads(line)["num_output_tokens"] == 12
               for line in out.read_text().splitlines())
    size = out.stat().st_size
    assert main(argv) == 0 and out.stat().st_size == size  # nothing left: no model load


def test_generate_records_bad_rows_and_honours_row_overrides(engine, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [
        {"id": 0, "prompt": "The capital of France is", "max_tokens": 3},
        '{"id": 1, "prompt": ',
        {"id": 2, "messages": [{"role": "user", "content": "Say hi."}], "stop": ["!"],
         "metadata": {"tag": "chat"}},
        {"id": 0, "prompt": "a repeated id"},
        {"id": "long", "prompt": "word " * 300},
        {"id": 3, "prompt": "Hello", "temperature": 9.0},
        {"id": 3, "prompt": "Hello again"}])
    out = tmp_path / "out.jsonl"
    base = {"temperature": 0.0, "max_tokens": 8}
    plan = plan_generate(inp, out, base, skip_invalid=True)
    assert [r.id for r in plan.rows] == [0, 2, "long"]
    assert [(r.line, r.id) for r in plan.invalid] == [(2, None), (4, None), (6, 3), (7, None)]
    stats = run_generate(engine, plan, base, use_tqdm=False)
    results = {(r["id"], r.get("line")): r for r in map(json.loads, out.read_text().splitlines())}
    assert stats.written == len(results) == 7 and not stats.interrupted
    assert results[(0, None)]["num_output_tokens"] == 3
    assert results[(0, None)]["finish_reason"] == "length"
    assert results[(2, None)]["metadata"] == {"tag": "chat"}
    assert results[("long", None)]["finish_reason"] == "error"
    assert "exceeds max_model_len=256" in results[("long", None)]["error"]
    assert "not valid JSON" in results[(None, 2)]["error"]
    assert "repeated" in results[(None, 4)]["error"]
    assert "temperature" in results[(3, 6)]["error"]
    assert "repeated (first on line 6)" in results[(None, 7)]["error"]
    assert plan_generate(inp, out, base, skip_invalid=True).num_pending == 0


def test_rows_the_engine_refuses_become_error_rows_and_the_rest_still_run(engine, tmp_path):
    # More refused rows than the in-flight window (2 * max_num_seqs) ahead of a good one.
    rows = [{"id": i, "prompt": "Hi", "stop_token_ids": [10**6]} for i in range(9)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows + [{"id": 9, "prompt": "Hi"}])
    base = {"temperature": 0.0, "max_tokens": 2}
    stats = run_generate(engine, plan_generate(inp, tmp_path / "out.jsonl", base, False), base,
                         use_tqdm=False)
    assert stats.finish_reasons == {"error": 9, "length": 1}
    results = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert all("stop_token_ids" in r["error"] for r in results if r["id"] != 9)


def test_sampled_row_text_depends_on_its_id_not_on_its_batch(engine, tmp_path):
    base = {"temperature": 1.0, "max_tokens": 6}
    rows = [{"id": i, "prompt": p} for i, p in enumerate(["Once upon a time", "Dogs are",
                                                           "Once upon a time"])]
    texts = {}
    for name, subset in [("all", rows), ("alone", rows[2:])]:
        inp = write_jsonl(tmp_path / f"{name}.jsonl", subset)
        run_generate(engine, plan_generate(inp, tmp_path / f"{name}.out", base, False), base,
                     seed=5, use_tqdm=False)
        texts[name] = {r["id"]: r["text"] for r in
                       map(json.loads, (tmp_path / f"{name}.out").read_text().splitlines())}
    assert texts["all"][2] == texts["alone"][2]


# -- errors for people ----------------------------------------------------------------------


@pytest.mark.parametrize("lines, message", [
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"', '{"id": 3, "prompt": "c"}'],
     "in.jsonl:2: not valid JSON"),
    (['{"id": 1.5, "prompt": "a"}'], '"id" must be a string or an integer, got 1.5 (a number)'),
    (['{"id": [1], "prompt": "a"}'], "got [1] (an array)"),
    (['{"id": true, "prompt": "a"}'], "got true (a boolean)"),
    ([], "the file is empty"),
    (["", "  "], "the file is empty"),
    (['{"id": 1, "prompt": "a", "max_token": 5}'], 'unknown field "max_token"; allowed: id,'),
    (['{"id": 1, "prompt": "a"}', '{"id": 1, "prompt": "b"}'], "repeated (first on line 1)"),
    (['{"id": 1, "prompt": "a", "top_p": 0}'], "in.jsonl:1: top_p must be in (0, 1]"),
    (['{"id": 1}'], 'exactly one of "prompt"'),
    (['["id", 1]'], "expected a JSON object"),
])
def test_bad_generate_input_stops_before_writing(tmp_path, capsys, lines, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines))
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": 0, "text": "kept"}\n')
    assert main(["generate", "--input", str(inp), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert out.read_text() == '{"id": 0, "text": "kept"}\n'


def test_bad_flags_and_files_exit_2(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}])
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--input", str(inp), "--output", str(out),
                 "--temperature", "5"]) == 2
    assert "argument --temperature: temperature must be in [0, 2.0]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--input", str(inp), "--output", str(out), "--max-tokens", "0"])
    assert exc.value.code == 2 and "--max-tokens: must be an integer >= 1, got 0" in \
        capsys.readouterr().err
    assert main(["generate", "--input", str(tmp_path / "nope.jsonl"), "--output", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["generate", "--input", str(inp), "--output", str(tmp_path / "no" / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    out.write_text('{"id": 1, "text": "a"}\nnot json\n{"id": 2, "text": "b"}\n')
    assert main(["generate", "--input", str(inp), "--output", str(out)]) == 2
    assert "out.jsonl:2: not a result row" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.tmp").exists()
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"id": 1, "context": "a", "continuations": [" b"],
                                              "answer": 3}])
    assert main(["loglikelihood", "--input", str(mc)]) == 2
    assert 'mc.jsonl:1: "answer" must be an index in [0, 1)' in capsys.readouterr().err
    text = tmp_path / "text.txt"
    text.write_text("Some text.")
    assert main(["perplexity", "--input", str(text), "--window", "8", "--stride", "9"]) == 2
    assert "--stride must be in [1, --window=8], got 9" in capsys.readouterr().err


def test_bad_input_fails_before_jax_is_imported(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    code = ("import sys; from jaxpaged.eval import main; "
            f"rc = main(['generate', '--input', {str(tmp_path / 'in.jsonl')!r}, '--output', "
            f"{str(tmp_path / 'out.jsonl')!r}]); print(rc, 'jax' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "the file is empty" in result.stderr and not (tmp_path / "out.jsonl").exists()


def test_recover_output_cuts_only_a_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": 1, "text": "a"}\n{"id": "x", "te')
    assert recover_output(out) == ({"1"}, len(b'{"id": "x", "te'))
    assert out.read_bytes() == b'{"id": 1, "text": "a"}\n'
    out.write_bytes(b'{"id": 1, "text": "a"}\nsomebody else\'s file')
    with pytest.raises(InputError, match="incomplete line that jaxpaged-eval did not write"):
        recover_output(out)


def test_example_data_is_valid():
    rows, invalid = read_generate_rows(DATA / "prompts.jsonl", {"temperature": 0.0}, False)
    assert len(rows) >= 20 and not invalid
    mc = read_loglikelihood_rows(DATA / "mc.jsonl")
    assert len(mc) >= 30 and all(r.answer is not None for r in mc)
