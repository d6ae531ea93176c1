"""The scheduler's tick plan, decided from plain data: no engine, classifier or test doubles."""

from __future__ import annotations

from moderation.serving.worker.tick_plan import (
    Held,
    Queued,
    TickState,
    gather_seconds,
    has_slots_for_checks,
    plan_tick,
    take_count,
)

NOW = 100.0


def classify(
    key: int, items: int = 1, *, deadline: float | None = None, cancelled: bool = False
) -> Queued:
    return Queued(key, deadline, cancelled, items, generation=False)


def generate(
    key: int, *, moderated: bool = False, deadline: float | None = None, cancelled: bool = False
) -> Queued:
    return Queued(key, deadline, cancelled, 1, generation=True, moderated_input=moderated)


def test_a_tick_takes_up_to_the_item_limit_and_always_one_job() -> None:
    queue = [classify(0, 3), classify(1, 3), classify(2, 3)]
    assert take_count(queue, 6) == 2
    assert take_count(queue, 7) == 3
    assert take_count([classify(0, 500), classify(1)], 256) == 1  # a big batch runs, alone
    assert take_count([], 256) == 0
    plan = plan_tick(TickState(NOW, queue, max_items_per_pass=4))
    assert plan.take == 2 and plan.classify == (0, 1)


def test_expired_queued_jobs_fail_and_cancelled_ones_are_dropped_silently() -> None:
    queue = [
        classify(0, deadline=NOW),  # due now: expired
        classify(1, cancelled=True, deadline=NOW - 1),  # cancelled wins: nobody to tell
        classify(2, deadline=NOW + 1),
        generate(3, deadline=NOW - 5),
        generate(4, cancelled=True),
    ]
    plan = plan_tick(TickState(NOW, queue))
    assert plan.take == 5
    assert plan.expired == (0, 3)
    assert plan.classify == (2,)
    assert plan.admit == ()


def test_inputs_ride_in_the_pass_and_slot_waiters_are_admitted_first() -> None:
    queue = [generate(0, moderated=True), classify(1), generate(2)]
    waiting = [Held(10, None, False), Held(11, NOW, False), Held(12, None, True)]
    plan = plan_tick(TickState(NOW, queue, slot_wait=waiting))
    assert plan.classify == (1,)
    assert plan.moderate_inputs == (0,)
    assert plan.admit == (10, 0, 2)  # the moderated one too: refused at execution if flagged
    assert plan.unwait_expired == (11,)  # 12 was cancelled: dropped, not failed
    assert plan.runs_classifier


def test_stopped_generations_leave_the_engine_and_only_live_checks_ride() -> None:
    running = [
        Held(0, None, False, check_due=True),
        Held(1, None, True, check_due=True),  # cancelled: stopped, its check does not ride
        Held(2, NOW - 1, False, check_due=True),  # expired: stopped and failed
        Held(3, None, False, check_due=False),
    ]
    plan = plan_tick(TickState(NOW, [], running=running))
    assert plan.stop == (1,)
    assert plan.stop_expired == (2,)
    assert plan.step_checks == (0,)
    assert not plan.runs_classifier and plan.take == 0


def test_output_checks_ride_unless_cancelled_even_past_the_deadline() -> None:
    checks = [Held(0, None, False), Held(1, None, True), Held(2, NOW - 1, False)]
    plan = plan_tick(TickState(NOW, [], output_checks=checks))
    assert plan.output_checks == (0, 2)
    assert plan.runs_classifier


def test_an_answer_checked_as_it_grows_needs_two_free_slots() -> None:
    assert has_slots_for_checks(free_slots=2, waiting=0)
    assert not has_slots_for_checks(free_slots=2, waiting=1)
    assert not has_slots_for_checks(free_slots=1, waiting=0)


def test_a_pass_waits_to_fill_only_within_the_batch_wait() -> None:
    def wait(**kw: object) -> float:
        args: dict[str, object] = dict(now=NOW, since=NOW - 0.002, items=3, full=32, wait=0.005,
                                       busy=False)  # fmt: skip
        args.update(kw)
        return gather_seconds(**args)  # type: ignore[arg-type]

    assert abs(wait() - 0.003) < 1e-9  # 2 ms of 5 gone since the later of arrival and last tick
    assert wait(since=NOW - 0.005) == 0.0 and wait(since=NOW - 1) == 0.0  # waited long enough
    assert wait(items=32) == 0.0 and wait(items=40) == 0.0  # the pass is full
    assert wait(wait=0.0) == 0.0  # off (the default)
    assert wait(busy=True) == 0.0  # generations run: their next token must not wait
    assert wait(since=None) == 0.0  # nothing queued
    assert wait(items=31) > 0
