import subprocess
import sys

import numpy as np
import pytest

from jaxpaged.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, make_logprobs_dict


def test_completion_finished() -> None:
    out = CompletionOutput(0, "hi", [1, 2], -0.5, None)
    assert not out.finished()
    out.finish_reason = "length"
    assert out.finished()


def test_bad_finish_reason() -> None:
    with pytest.raises(ValueError, match="finish_reason.*'done'"):
        CompletionOutput(0, "", [], None, None, finish_reason="done")  # type: ignore[arg-type]


def test_from_error() -> None:
    metrics = RequestMetrics(arrival_time=1.0, last_token_time=1.0, finished_time=1.0)
    out = RequestOutput.from_error("r1", "n must be >= 1, got 0.", prompt="x", prompt_token_ids=[5], metrics=metrics)
    assert out.finished and out.error == "n must be >= 1, got 0." and out.prompt_token_ids == [5]
    assert [(o.index, o.text, o.token_ids, o.finish_reason) for o in out.outputs] == [(0, "", [], "error")]
    assert out.outputs[0].finished()


def test_make_logprobs_dict_sampled_first_and_deduplicated() -> None:
    top_ids, top_lps = np.array([4, 2, 9]), np.array([-0.1, -2.0, -3.0], np.float32)
    d = make_logprobs_dict(2, -2.0, 2, top_ids, top_lps, num_logprobs=3, decode=lambda t: f"<{t}>")
    assert list(d) == [2, 4, 9]
    assert d[2] == Logprob(-2.0, 2, "<2>") and d[4] == Logprob(pytest.approx(-0.1), 1, "<4>")
    assert d[9].rank == 3
    d = make_logprobs_dict(7, -5.0, 12, top_ids, top_lps, num_logprobs=1)
    assert list(d) == [7, 4] and d[7] == Logprob(-5.0, 12, None)
    assert list(make_logprobs_dict(7, -5.0, 12, top_ids, top_lps, num_logprobs=0)) == [7]
    with pytest.raises(ValueError, match="num_logprobs"):
        make_logprobs_dict(7, -5.0, 12, top_ids, top_lps, num_logprobs=4)


def test_host_only() -> None:
    code = "import sys, jaxpaged.outputs; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
