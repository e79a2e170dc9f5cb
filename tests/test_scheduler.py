import random

import pytest
from hypothesis import HealthCheck, event, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxpaged.sampling_params import SamplingParams
from jaxpaged.scheduler import PLACEHOLDER_TOKEN_ID, Scheduler, SchedulerConfig, SchedulerOutput
from jaxpaged.sequence import Request, RequestStatus

EOS = 2


def make_scheduler(**overrides) -> Scheduler:
    config = dict(max_model_len=64, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    config.update(overrides)
    return Scheduler(SchedulerConfig(**config))


def make_request(request_id: str, prompt: list[int], eos_token_id: int | None = EOS, **params) -> Request:
    params.setdefault("max_tokens", 8)
    return Request(request_id, prompt, SamplingParams(**params), eos_token_id=eos_token_id)


def fake_token(request: Request) -> int:
    """A deterministic "model": the next token depends only on the sequence so far (never EOS)."""
    return 10 + (sum(request.all_token_ids) + request.num_tokens) % 50


def step(sched: Scheduler, tokens: dict[str, int] | None = None) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    sampled = {s.request_id: fake_token(sched.requests[s.request_id]) for s in out.scheduled_requests if s.sample}
    if out.num_steps > 1:  # a multi-step window: each request's tokens as a list
        sampled = {s.request_id: [sampled[s.request_id]] * s.num_steps for s in out.scheduled_requests}
    sampled.update(tokens or {})
    changed = sched.update_from_output(out, sampled)
    sched.block_manager.check_invariants(sched.requests.values())
    return out, changed


def run_to_completion(sched: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    outputs = []
    while sched.has_requests():
        outputs.append(step(sched)[0])
        assert len(outputs) < max_steps
    assert sched.block_manager.num_free_blocks == sched.config.num_blocks - 1
    return outputs


def test_single_request_prefill_then_decode():
    sched = make_scheduler()
    req = make_request("a", list(range(20, 30)), max_tokens=3)
    sched.add_request(req)
    out, changed = step(sched)
    [s] = out.scheduled_requests
    assert (s.request_id, s.start_pos, s.token_ids, s.sample) == ("a", 0, list(range(20, 30)), True)
    assert len(s.block_ids) == 3 and out.total_num_scheduled_tokens == 10
    assert changed == [req] and req.num_output_tokens == 1 and req.status == RequestStatus.RUNNING
    out, _ = step(sched)
    [s] = out.scheduled_requests
    assert s.start_pos == 10 and s.token_ids == [req.output_token_ids[0]] and s.sample
    out, changed = step(sched)
    assert req.status == RequestStatus.FINISHED_LENGTH and req.num_output_tokens == 3
    assert not sched.has_unfinished_requests() and sched.has_requests()
    out = sched.schedule()
    assert out.is_empty and out.finished_req_ids == ["a"]
    assert not sched.has_requests()


def test_chunked_prefill_splits_a_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=8, max_num_seqs=2)
    req = make_request("a", list(range(30, 50)), max_tokens=2)
    sched.add_request(req)
    chunks = []
    for _ in range(3):
        out, _ = step(sched)
        [s] = out.scheduled_requests
        chunks.append((s.start_pos, len(s.token_ids), s.sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert req.num_output_tokens == 1 and req.num_computed_tokens == 20


def test_running_first_then_waiting_under_budget_and_max_num_seqs():
    sched = make_scheduler(max_num_batched_tokens=12, max_num_seqs=2)
    a, b, c = (make_request(x, [i + 3] * 11, max_tokens=4) for i, x in enumerate("abc"))
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = step(sched)  # a's 11 tokens, then 1 token of b
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled_requests] == [("a", 11), ("b", 1)]
    out, _ = step(sched)  # running first, in order; c waits: max_num_seqs
    assert [(s.request_id, len(s.token_ids)) for s in out.scheduled_requests] == [("a", 1), ("b", 10)]
    assert out.total_num_scheduled_tokens <= 12
    assert [r.request_id for r in sched.running] == ["a", "b"] and list(sched.waiting) == [c]


def test_prefix_cache_hit_across_requests():
    sched = make_scheduler()
    shared = list(range(100, 112))  # three full blocks
    a = make_request("a", shared + [1, 2], max_tokens=1)
    sched.add_request(a)
    run_to_completion(sched)
    b = make_request("b", shared + [3], max_tokens=1)
    sched.add_request(b)
    out, _ = step(sched)
    [s] = out.scheduled_requests
    assert b.num_cached_tokens == 12 and s.start_pos == 12 and s.token_ids == [3]
    stats = sched.get_stats()
    assert stats.prefix_cache_hits == 12 and stats.prefix_cache_hit_rate > 0


def test_parallel_sampling_children_share_prompt_blocks():
    sched = make_scheduler(max_num_batched_tokens=8)
    prompt = list(range(200, 218))  # 4 full blocks + 2 tokens
    children = [make_request(f"c{i}", prompt, max_tokens=3, n=3, temperature=1.0) for i in range(3)]
    for child in children:
        sched.add_request(child)
    # While c0 prefills, its siblings wait for its blocks instead of computing them again.
    for _ in range(2):
        out, _ = step(sched)
        assert [s.request_id for s in out.scheduled_requests] == ["c0"]
    out, _ = step(sched)  # c0 finishes its prompt; the last full block is now cached
    out, _ = step(sched)
    assert {"c1", "c2"} <= {s.request_id for s in out.scheduled_requests}
    assert children[1].num_cached_tokens == children[2].num_cached_tokens == 16
    shared = children[0].block_ids[:4]
    assert all(child.block_ids[:4] == shared for child in children)
    assert [sched.block_manager.blocks[b].ref_cnt for b in shared] == [3] * 4
    run_to_completion(sched)
    assert all(child.num_output_tokens == 3 for child in children)


def test_held_back_sibling_keeps_its_place_but_does_not_block_others():
    sched = make_scheduler(max_num_batched_tokens=20)
    prompt = list(range(200, 218))
    c0, c1 = (make_request(f"c{i}", prompt, n=2) for i in range(2))
    other = make_request("other", [7, 8])
    for r in (c0, c1, other):
        sched.add_request(r)
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled_requests] == ["c0", "other"]
    assert list(sched.waiting) == [c1]
    out, _ = step(sched)
    assert [s.request_id for s in out.scheduled_requests] == ["c0", "other", "c1"]
    assert c1.num_cached_tokens == 16 and out.scheduled_requests[2].token_ids == prompt[16:]


def test_prompt_logprobs_siblings_are_not_held_back():
    sched = make_scheduler()
    prompt = list(range(200, 218))
    for i in range(3):
        sched.add_request(make_request(f"c{i}", prompt, n=3, prompt_logprobs=1))
    out, _ = step(sched)
    assert [s.start_pos for s in out.scheduled_requests] == [0, 0, 0]


def test_preemption_by_recompute_gives_the_same_tokens():
    def run(num_blocks: int) -> tuple[dict[str, list[int]], Scheduler]:
        sched = make_scheduler(num_blocks=num_blocks, block_size=2, max_model_len=32)
        reqs = [make_request(x, [i + 3] * 5, max_tokens=10, ignore_eos=True) for i, x in enumerate("abc")]
        for r in reqs:
            sched.add_request(r)
        run_to_completion(sched)
        return {r.request_id: r.output_token_ids for r in reqs}, sched

    expected, roomy = run(num_blocks=64)
    got, tight = run(num_blocks=12)  # 11 usable blocks, each request needs up to 8
    assert roomy.num_preemptions == 0 and tight.num_preemptions > 0
    assert got == expected


def test_preemption_victim_is_the_most_recently_admitted():
    sched = make_scheduler(num_blocks=7, block_size=2, max_model_len=12)  # 6 usable blocks
    a = make_request("a", [3, 4, 5], max_tokens=8, ignore_eos=True)
    b = make_request("b", [6, 7, 8], max_tokens=8, ignore_eos=True)
    sched.add_request(a)
    sched.add_request(b)
    preempted = []
    while not preempted:
        out, _ = step(sched)
        preempted = out.preempted_req_ids
    # b was admitted last: it is preempted (by itself, being last in `running`) and a goes on.
    assert preempted == ["b"] and [s.request_id for s in out.scheduled_requests] == ["a"]
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.waiting[0] is b and sched.running == [a]
    sched.add_request(make_request("c", [9], max_tokens=1))
    assert sched.waiting[0] is b  # a preempted request resumes before newer ones
    run_to_completion(sched)
    assert a.num_output_tokens == b.num_output_tokens == 8


def test_admitted_marks_first_and_resumed_schedules_only():
    """The runner rebuilds a request's block-table row exactly when `admitted` says its table
    is new: at its first schedule and when it resumes after preemption."""
    sched = make_scheduler(num_blocks=7, block_size=2, max_model_len=12)  # 6 usable blocks
    for rid, prompt in (("a", [3, 4, 5]), ("b", [6, 7, 8])):
        sched.add_request(make_request(rid, prompt, max_tokens=8, ignore_eos=True))
    seen: set[str] = set()
    preempted: set[str] = set()
    while sched.has_requests():
        out, _ = step(sched)
        for s in out.scheduled_requests:
            assert s.admitted == (s.request_id not in seen or s.request_id in preempted)
            seen.add(s.request_id)
            preempted.discard(s.request_id)
        preempted.update(out.preempted_req_ids)
    assert sched.num_preemptions > 0


def test_too_long_requests_are_rejected_alone():
    sched = make_scheduler(max_model_len=16, num_blocks=5, block_size=4)  # 4 usable blocks
    too_long = make_request("long", list(range(17)))
    too_big = make_request("big", list(range(10)), max_tokens=16)  # up to 16 tokens of KV: 4 blocks
    ok = make_request("ok", list(range(10)), max_tokens=4)
    empty = make_request("empty", [])
    for r in (too_long, too_big, ok, empty):
        sched.add_request(r)
    assert too_long.status == RequestStatus.FINISHED_ERROR
    assert "prompt length 17 exceeds max_model_len=16" in too_long.error
    assert too_big.status == RequestStatus.WAITING
    assert empty.status == RequestStatus.FINISHED_ERROR and "empty" in empty.error
    huge = make_request("huge", list(range(10)), max_tokens=16)
    sched2 = make_scheduler(max_model_len=32, num_blocks=5, block_size=4)
    sched2.add_request(huge)
    assert huge.status == RequestStatus.FINISHED_ERROR
    assert "prompt length 10 plus up to 16 generated tokens needs up to 7 KV blocks" in huge.error
    assert "only 4" in huge.error

    out, changed = step(sched)
    assert out.errored_req_ids == ["long", "empty"] and set(out.finished_req_ids) == {"long", "empty"}
    assert changed[:2] == [too_long, empty]
    assert {s.request_id for s in out.scheduled_requests} <= {"big", "ok"}
    run_to_completion(sched)
    assert ok.num_output_tokens == 4 and too_big.status == RequestStatus.FINISHED_LENGTH


def test_duplicate_request_id_is_rejected():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="'a' is already"):
        sched.add_request(make_request("a", [1]))


@pytest.mark.parametrize(
    "params, eos, tokens, status, num_out, stop_reason",
    [
        ({}, EOS, [7, EOS, 9], RequestStatus.FINISHED_STOPPED, 2, None),
        ({"ignore_eos": True, "max_tokens": 3}, EOS, [7, EOS, 9], RequestStatus.FINISHED_LENGTH, 3, None),
        ({"min_tokens": 3}, EOS, [EOS, EOS, EOS, 9], RequestStatus.FINISHED_STOPPED, 3, None),
        ({"stop_token_ids": [42]}, None, [7, 42], RequestStatus.FINISHED_STOPPED, 2, 42),
        ({"stop_token_ids": [42], "min_tokens": 2}, None, [42, 42], RequestStatus.FINISHED_STOPPED, 2, 42),
        ({"max_tokens": 2}, EOS, [7, 8, 9], RequestStatus.FINISHED_LENGTH, 2, None),
        ({"max_tokens": None}, EOS, [7] * 20, RequestStatus.FINISHED_LENGTH, 8, None),  # max_model_len 12
    ],
)
def test_stop_conditions(params, eos, tokens, status, num_out, stop_reason):
    sched = make_scheduler(max_model_len=12)
    params.setdefault("max_tokens", 8)
    req = Request("r", [1, 3, 4, 5], SamplingParams(**params), eos_token_id=eos)
    sched.add_request(req)
    for token in tokens:
        step(sched, {"r": token})
        if req.is_finished:
            break
    assert (req.status, req.num_output_tokens, req.stop_reason) == (status, num_out, stop_reason)
    assert req.block_ids == [] and not sched.has_unfinished_requests()


def test_abort_frees_blocks_and_is_reported():
    sched = make_scheduler()
    a, b = make_request("a", list(range(9))), make_request("b", list(range(10, 19)))
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert sched.finish_requests("a", RequestStatus.FINISHED_ABORTED) == [a]
    assert a.status == RequestStatus.FINISHED_ABORTED and a.block_ids == []
    assert sched.finish_requests(["a", "unknown"], RequestStatus.FINISHED_ABORTED) == []
    out = sched.schedule()
    assert out.finished_req_ids == ["a"] and [s.request_id for s in out.scheduled_requests] == ["b"]
    # Aborted between schedule() and update_from_output(): its result is dropped.
    sched.finish_requests("b", RequestStatus.FINISHED_STOPPED)
    assert sched.update_from_output(out, {"b": 11}) == []
    assert b.num_output_tokens == 1 and sched.block_manager.num_free_blocks == 63
    assert sched.schedule().finished_req_ids == ["b"]
    with pytest.raises(ValueError, match="finished_status"):
        sched.finish_requests("x", RequestStatus.RUNNING)


def test_waiting_request_can_be_aborted():
    sched = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", [1, 3]), make_request("b", [1, 4])
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert list(sched.waiting) == [] and sched.get_num_unfinished_requests() == 1


def test_schedule_twice_without_update_is_an_error():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 3]))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="update_from_output"):
        sched.schedule()
    sched.update_from_output(out, {"a": 5})
    sched.schedule()


def test_max_num_blocks_per_req():
    assert make_scheduler(max_model_len=17, block_size=4).config.max_num_blocks_per_req == 5


def test_missing_sampled_token_is_an_error():
    sched = make_scheduler()
    sched.add_request(make_request("a", [1, 3]))
    out = sched.schedule()
    with pytest.raises(ValueError, match=r"no token for \['a'\]"):
        sched.update_from_output(out, {})
    a = sched.requests["a"]
    assert (a.output_token_ids, a.num_output_placeholders) == ([], 1)  # nothing applied
    sched.update_from_output(out, {"a": 5})
    assert sched.requests["a"].output_token_ids == [5]


def test_prompt_logprobs_request_takes_no_prefix_hit():
    sched = make_scheduler()
    sched.add_request(make_request("a", list(range(20, 29)), max_tokens=1))
    run_to_completion(sched)
    b = make_request("b", list(range(20, 29)), max_tokens=1, prompt_logprobs=1)
    sched.add_request(b)
    out, _ = step(sched)
    assert b.num_cached_tokens == 0 and out.scheduled_requests[0].start_pos == 0


def test_stats():
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("a", [1, 3, 4, 5, 6]))
    sched.add_request(make_request("b", [1, 3]))
    step(sched)
    stats = sched.get_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.num_preemptions) == (1, 1, 0)
    assert stats.kv_cache_usage == pytest.approx(2 / 63)
    assert stats.prefix_cache_queries == 5


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"max_model_len": 0}, "max_model_len"),
        ({"num_blocks": 1}, "num_blocks"),
        ({"block_size": 0}, "block_size"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_seqs": 16, "max_num_batched_tokens": 8}, "max_num_batched_tokens"),
    ],
)
def test_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_scheduler(**overrides)


# -- multi-step windows -----------------------------------------------------------------------


def prefilled(sched: Scheduler, *requests: Request) -> None:
    """Add the requests and run the prefill step that gives each its first token."""
    for r in requests:
        sched.add_request(r)
    out, _ = step(sched)
    assert out.num_steps == 1 and all(r.num_output_tokens == 1 for r in requests)


def test_a_window_allocates_its_steps_and_appends_its_tokens_in_order():
    sched = make_scheduler(num_scheduler_steps=4, block_size=4)
    a = make_request("a", list(range(20, 26)), max_tokens=20)  # 6 tokens: the window crosses a block
    b = make_request("b", list(range(30, 33)), max_tokens=3)  # 2 steps left after its first token
    prefilled(sched, a, b)
    out = sched.schedule()
    assert out.num_steps == 4 and out.total_num_scheduled_tokens == 2
    sa, sb = out.scheduled_requests
    assert (sa.token_ids, sa.start_pos, sa.num_steps) == ([a.output_token_ids[0]], 6, 4)
    assert (sb.start_pos, sb.num_steps) == (3, 2)  # max_tokens 3: two more tokens
    # Positions 6..9 are written: three blocks of 4; the placeholders are the window's samples.
    assert len(sa.block_ids) == 3 and a.num_computed_tokens == 10 and a.num_output_placeholders == 4
    assert b.num_computed_tokens == 5 and b.num_output_placeholders == 2
    changed = sched.update_from_output(out, {"a": [41, 42, 43, 44], "b": [51, 52]})
    assert changed == [a, b]
    assert a.output_token_ids[1:] == [41, 42, 43, 44] and a.num_output_placeholders == 0
    assert b.output_token_ids[1:] == [51, 52] and b.status == RequestStatus.FINISHED_LENGTH
    assert b.block_ids == [] and "b" not in sched.requests
    sched.block_manager.check_invariants(sched.requests.values())


def test_a_window_refuses_results_of_the_wrong_shape_and_changes_nothing():
    sched = make_scheduler(num_scheduler_steps=3)
    a = make_request("a", [20, 21, 22], max_tokens=20)
    prefilled(sched, a)
    out = sched.schedule()
    for bad in ({"a": 40}, {"a": [40, 41]}, {}):
        with pytest.raises(ValueError, match="'a'"):
            sched.update_from_output(out, bad)
    assert a.num_output_tokens == 1 and a.num_output_placeholders == 3
    sched.update_from_output(out, {"a": [40, 41, 42]})
    assert a.output_token_ids[1:] == [40, 41, 42]


def test_a_stop_inside_a_window_drops_the_tokens_after_it():
    sched = make_scheduler(num_scheduler_steps=4)
    a = make_request("a", [20, 21, 22], max_tokens=20, stop_token_ids=[7])
    c = make_request("c", [23, 24, 25], max_tokens=20)
    prefilled(sched, a, c)
    out = sched.schedule()
    assert out.num_steps == 4
    changed = sched.update_from_output(out, {"a": [40, 7, 41, 42], "c": [EOS, 43, 44, 45]})
    assert changed == [a, c]
    assert a.output_token_ids[1:] == [40, 7] and a.stop_reason == 7
    assert c.output_token_ids[1:] == [EOS] and c.status == RequestStatus.FINISHED_STOPPED
    assert not sched.requests and sched.block_manager.num_free_blocks == 63


def test_a_window_is_planned_only_when_every_request_allows_it():
    def window_after_prefill(*requests, **config) -> int:
        sched = make_scheduler(num_scheduler_steps=3, **config)
        prefilled(sched, *requests)
        return sched.schedule().num_steps

    assert window_after_prefill(make_request("a", [20, 21], max_tokens=9)) == 3
    # Logprobs and penalties are computed a step at a time on the host's request.
    assert window_after_prefill(make_request("a", [20, 21], max_tokens=9),
                                make_request("b", [22, 23], max_tokens=9, logprobs=1)) == 1
    assert window_after_prefill(make_request("a", [20, 21], max_tokens=9,
                                             repetition_penalty=1.2)) == 1
    # Under min_tokens, the stop ids are suppressed a step at a time (the next sample is the
    # second output: suppressed under min_tokens 2, free under 1).
    assert window_after_prefill(make_request("a", [20, 21], max_tokens=9, min_tokens=2)) == 1
    assert window_after_prefill(make_request("a", [20, 21], max_tokens=9, min_tokens=1)) == 3
    # Nobody can use the whole window.
    assert window_after_prefill(make_request("a", [20, 21], max_tokens=3)) == 1
    # A waiting request that could be admitted is admitted now, not after a window.
    sched = make_scheduler(num_scheduler_steps=3, max_num_seqs=2)
    prefilled(sched, make_request("a", [20, 21], max_tokens=9))
    sched.add_request(make_request("b", [22, 23], max_tokens=9))
    out = sched.schedule()
    assert out.num_steps == 1 and [s.request_id for s in out.scheduled_requests] == ["a", "b"]
    # ... but with every sequence slot taken, the waiting one cannot be admitted anyway.
    sched = make_scheduler(num_scheduler_steps=3, max_num_seqs=1)
    prefilled(sched, make_request("a", [20, 21], max_tokens=9))
    sched.add_request(make_request("b", [22, 23], max_tokens=9))
    assert sched.schedule().num_steps == 3


def test_async_after_a_window_feeds_its_last_sample_and_preempts_for_its_blocks():
    # 5 usable blocks of 2 tokens: the prefills take 2 each, a window of 3 one more each.
    sched = make_scheduler(num_scheduler_steps=3, block_size=2, num_blocks=6,
                           max_outputs_in_flight=2)
    a = make_request("a", [20, 21, 22], max_tokens=7)
    b = make_request("b", [23, 24, 25], max_tokens=7)
    prefilled(sched, a, b)
    first = sched.schedule()
    assert first.num_steps == 3 and first.preempted_req_ids == ["b"]
    assert [s.request_id for s in first.scheduled_requests] == ["a"]
    second = sched.schedule()  # planned before the first is applied
    [s] = second.scheduled_requests
    assert s.token_ids == [PLACEHOLDER_TOKEN_ID] and s.start_pos == 6
    sched.update_from_output(first, {"a": [30, 31, 32]})
    assert a.all_token_ids[s.start_pos] == 32  # the placeholder is the window's last sample
    assert second.num_steps == 1  # b waits with a sequence slot free: no window
    sched.update_from_output(second, {"a": 33})
    run_to_completion(sched)
    assert a.num_output_tokens == 7 and b.num_output_tokens == 7 and b.num_preemptions == 1


# -- stateful: random traffic against a tiny cache -------------------------------------------

class SchedulerMachine(RuleBasedStateMachine):
    """Adds, steps (with random sampled tokens), aborts and forced preemptions (a tiny cache,
    squeezed further by blocks taken away); after every rule the bookkeeping must add up.
    With max_outputs_in_flight=2 (async scheduling) a step schedules the next output before
    the previous one is applied, as the engine does; with num_scheduler_steps > 1 some outputs
    are multi-step windows (num_scheduler_steps 2 or 3), whose requests get lists of tokens."""

    @initialize(
        num_blocks=st.integers(4, 16),
        block_size=st.sampled_from([1, 1, 2, 4]),
        max_num_seqs=st.integers(1, 4),
        extra_budget=st.integers(0, 8),
        max_model_len=st.integers(4, 24),
        enable_prefix_caching=st.booleans(),
        max_outputs_in_flight=st.sampled_from([1, 2]),
        num_scheduler_steps=st.sampled_from([1, 2, 3]),
    )
    def init(self, num_blocks, block_size, max_num_seqs, extra_budget, max_model_len, enable_prefix_caching,
             max_outputs_in_flight, num_scheduler_steps):
        self.config = SchedulerConfig(
            max_model_len=max_model_len,
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_seqs + extra_budget,
            enable_prefix_caching=enable_prefix_caching,
            max_outputs_in_flight=max_outputs_in_flight,
            num_scheduler_steps=num_scheduler_steps,
        )
        self.sched = Scheduler(self.config)
        self.in_flight: list = []  # scheduled outputs not applied yet, oldest first
        self.next_id = 0
        self.hogs: list[Request] = []  # blocks taken away behind the scheduler's back

    @rule(
        data=st.data(),
        n=st.integers(1, 3),
        max_tokens=st.integers(1, 12),
        min_tokens=st.integers(0, 2),
        ignore_eos=st.booleans(),
        prompt_logprobs=st.sampled_from([None, None, 1]),
        logprobs=st.sampled_from([None, None, None, 1]),
    )
    def add(self, data, n, max_tokens, min_tokens, ignore_eos, prompt_logprobs, logprobs):
        # Mostly prompts that fit, a few that are empty or too long; a small alphabet makes
        # shared prefixes (and prefix hits) common.
        cfg = self.config
        max_len = data.draw(st.sampled_from([cfg.max_model_len + 1, (cfg.num_blocks - 1) * cfg.block_size // 2]))
        prompt = data.draw(st.lists(st.integers(0, 3), max_size=max_len))
        params = SamplingParams(
            n=n, max_tokens=max_tokens, min_tokens=min(min_tokens, max_tokens), ignore_eos=ignore_eos,
            stop_token_ids=[3], prompt_logprobs=prompt_logprobs, logprobs=logprobs,
        )
        for _ in range(n):  # parallel sampling: n children with one prompt
            req = Request(f"r{self.next_id}", prompt, params, eos_token_id=EOS)
            self.next_id += 1
            self.sched.add_request(req)
            final_len = min(len(prompt) + max_tokens, max(self.config.max_model_len, len(prompt) + 1))
            fits = 0 < len(prompt) <= self.config.max_model_len and (
                -(-(final_len - 1) // self.config.block_size) <= self.config.num_blocks - 1
            )
            assert (req.status == RequestStatus.WAITING) == fits
            assert fits or req.error

    @rule(data=st.data(), abort_mid_step=st.booleans(), drain=st.booleans())
    def step(self, data, abort_mid_step, drain):
        """Schedule one output; apply the oldest once max_outputs_in_flight are out (or all of
        them when `drain`)."""
        sched, cfg = self.sched, self.config
        running_before = [r.request_id for r in sched.running]
        previous = self.in_flight[-1] if self.in_flight else None
        out = sched.schedule()
        self.in_flight.append(out)
        ids = [s.request_id for s in out.scheduled_requests]
        assert len(set(ids)) == len(ids) and not set(ids) & set(out.preempted_req_ids)
        assert out.total_num_scheduled_tokens == sum(len(s.token_ids) for s in out.scheduled_requests)
        assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs
        old = [i for i in ids if i in running_before]
        # Running first, in order (one whose step in flight ends it by length is skipped).
        assert ids[: len(old)] == old == [i for i in running_before if i in old]
        if out.num_steps > 1:  # a multi-step window: decodes only, of requests that allow it
            assert out.num_steps == cfg.num_scheduler_steps and ids
            for s in out.scheduled_requests:
                req = sched.requests[s.request_id]
                assert len(s.token_ids) == 1 and s.sample and 1 <= s.num_steps <= out.num_steps
                assert req.multi_step and req.sampling_params.logprobs is None
                assert s.start_pos - req.num_prompt_tokens >= req.min_tokens - 1
            # The window is as long as some request can use (unless that one was preempted).
            assert max(s.num_steps for s in out.scheduled_requests) == out.num_steps or \
                out.preempted_req_ids
            event("multi-step window")
        else:
            assert all(s.num_steps == 1 for s in out.scheduled_requests)
        for s in out.scheduled_requests:
            req = sched.requests[s.request_id]
            # Positions written by the step(s): one a token fed, one a step of a window.
            end = s.start_pos + len(s.token_ids) - 1 + s.num_steps
            assert s.token_ids and end == req.num_computed_tokens  # advanced at schedule time
            known = req.all_token_ids[s.start_pos : end]
            assert s.token_ids[: len(known)] == known
            assert s.token_ids[len(known) :] == [PLACEHOLDER_TOKEN_ID] * (len(s.token_ids) - len(known))
            if len(known) < len(s.token_ids):
                # One placeholder, sampled by the step right before, which is still in flight.
                assert len(s.token_ids) - len(known) == 1 and cfg.max_outputs_in_flight == 2
                assert any(p.request_id == s.request_id and p.sample for p in previous.scheduled_requests)
                event("placeholder fed")
            total = req.num_tokens + req.num_output_placeholders
            assert end == total - 1 if s.sample else end < total
            assert len(s.block_ids) * cfg.block_size >= end and 0 not in s.block_ids
        if out.preempted_req_ids:
            event("preempted")
        if abort_mid_step and ids:
            sched.finish_requests(data.draw(st.sampled_from(ids)), RequestStatus.FINISHED_ABORTED)
        while len(self.in_flight) >= cfg.max_outputs_in_flight or (drain and self.in_flight):
            self.apply_oldest(data.draw(st.lists(st.integers(0, 12), min_size=3, max_size=3)))

    def apply_oldest(self, tokens: list[int]):
        """Apply the oldest output: a request samples tokens[0], or in a window tokens[:k]."""
        sched = self.sched
        out = self.in_flight.pop(0)
        sampled = {s.request_id: tokens[: s.num_steps] if out.num_steps > 1 else tokens[0]
                   for s in out.scheduled_requests if s.sample}
        lengths = {s.request_id: sched.requests[s.request_id].num_output_tokens
                   for s in out.scheduled_requests if s.request_id in sched.requests}
        for req in sched.update_from_output(out, sampled):
            assert req.is_finished or req.status in (RequestStatus.RUNNING, RequestStatus.PREEMPTED)
            if req.is_finished:
                assert req.block_ids == [] and req.request_id not in sched.requests
            if req.request_id in lengths:  # its tokens, in order, up to the first that stops it
                new = req.output_token_ids[lengths[req.request_id]:]
                got = sampled[req.request_id]
                got = got if isinstance(got, list) else [got]
                assert new == got[: len(new)] and new
                assert len(new) == len(got) or req.is_finished
        # A placeholder in the next output is the token this output sampled last.
        for nxt in self.in_flight:
            for s in nxt.scheduled_requests:
                req = sched.requests.get(s.request_id)
                if s.token_ids[-1] == PLACEHOLDER_TOKEN_ID and req is not None:
                    last = sampled[s.request_id]
                    last = last[-1] if isinstance(last, list) else last
                    assert req.all_token_ids[s.start_pos + len(s.token_ids) - 1] == last

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data())
    def abort(self, data):
        request_id = data.draw(st.sampled_from(sorted(self.sched.requests)))
        [req] = self.sched.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        assert req.block_ids == [] and req.status == RequestStatus.FINISHED_ABORTED

    @rule(num_blocks=st.integers(1, 6))
    def squeeze(self, num_blocks):
        """Take free blocks away, as a tenant outside the scheduler would: forces preemptions."""
        hog = Request(f"hog{len(self.hogs)}", [0] * (num_blocks * self.config.block_size), SamplingParams())
        if self.sched.block_manager.allocate_slots(hog, hog.num_tokens):
            self.hogs.append(hog)

    @precondition(lambda self: self.hogs)
    @rule()
    def release(self):
        self.sched.block_manager.free(self.hogs.pop())

    @invariant()
    def bookkeeping_adds_up(self):
        if not hasattr(self, "sched"):
            return
        sched = self.sched
        sched.block_manager.check_invariants([*sched.requests.values(), *self.hogs])
        waiting = {r.request_id for r in sched.waiting}
        running = {r.request_id for r in sched.running}
        assert not waiting & running and waiting | running == set(sched.requests)
        for req in sched.waiting:
            assert req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert req.block_ids == [] and req.num_computed_tokens == 0
        for req in sched.requests.values():
            assert req.num_output_placeholders <= len(self.in_flight) * self.config.num_scheduler_steps
        for req in sched.running:
            assert req.status == RequestStatus.RUNNING
            assert req.num_tokens <= self.config.max_model_len
            assert req.num_computed_tokens <= req.num_tokens + req.num_output_placeholders
            if not self.in_flight:
                assert req.num_computed_tokens < req.num_tokens
            # So the runner can size its block table at cdiv(max_model_len, block_size).
            assert len(req.block_ids) <= self.config.max_num_blocks_per_req

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        target(float(self.sched.num_preemptions), label="preemptions")  # steer toward preemptions
        while self.hogs:
            self.release()
        rng = random.Random(0)
        for _ in range(2000):  # liveness: every request ends without outside help
            if not self.sched.has_requests() and not self.in_flight:
                break
            if self.sched.has_requests():
                self.in_flight.append(self.sched.schedule())
            if len(self.in_flight) >= self.config.max_outputs_in_flight or not self.sched.has_requests():
                self.apply_oldest([rng.randrange(7) for _ in range(3)])
            self.bookkeeping_adds_up()
        assert not self.sched.has_requests() and not self.in_flight
        bm = self.sched.block_manager
        assert bm.num_free_blocks == self.config.num_blocks - 1 and bm.usage == 0.0
        bm.check_invariants([])


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSchedulerStateful = SchedulerMachine.TestCase
