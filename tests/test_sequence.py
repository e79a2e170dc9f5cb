import numpy as np
import pytest

from jaxpaged.sampling_params import SamplingParams
from jaxpaged.sequence import Request, RequestStatus


def test_request_token_views():
    req = Request("r", [1, 2, 3], SamplingParams())
    assert (req.num_tokens, req.num_prompt_tokens, req.num_output_tokens) == (3, 3, 0)
    req.append_output_token_ids(7)
    req.append_output_token_ids([8, np.int64(9)])
    assert req.output_token_ids == [7, 8, 9]
    assert req.all_token_ids == [1, 2, 3, 7, 8, 9]
    assert all(type(t) is int for t in req.all_token_ids)
    assert req.num_tokens == 6 and req.num_output_tokens == 3
    assert req.prompt_token_ids == [1, 2, 3]


def test_request_copies_its_inputs():
    prompt = [1, 2]
    req = Request("r", prompt, SamplingParams(), output_token_ids=[5])
    prompt.append(3)
    assert req.all_token_ids == [1, 2, 5]


def test_request_defaults():
    req = Request("r", [1], SamplingParams())
    assert req.status == RequestStatus.WAITING
    assert req.block_ids == [] and req.num_computed_tokens == 0 and req.num_preemptions == 0
    assert req.stop_reason is None and req.error is None and req.arrival_time > 0
    assert not req.is_finished


def test_request_validation():
    with pytest.raises(ValueError, match="num_computed_tokens"):
        Request("r", [1], SamplingParams(), num_computed_tokens=-1)
    with pytest.raises(ValueError, match="request_id"):
        Request(3, [1], SamplingParams())


def test_request_has_slots():
    req = Request("r", [1], SamplingParams())
    with pytest.raises(AttributeError):
        req.not_a_field = 1


def test_status_is_finished_and_reason():
    unfinished = {RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED}
    for status in RequestStatus:
        assert status.is_finished() == (status not in unfinished)
        assert RequestStatus.is_finished(status) == status.is_finished()
    assert RequestStatus.FINISHED_STOPPED.finish_reason == "stop"
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert RequestStatus.FINISHED_ABORTED.finish_reason == "abort"
    assert RequestStatus.FINISHED_ERROR.finish_reason == "error"
    assert RequestStatus.RUNNING.finish_reason is None
