"""What one scheduler tick does, decided from plain data: a pure function, no engine.

`plan_tick` reads the queue and the generations the scheduler holds (their deadlines, whether
their callers cancelled, whether an answer's check is due) and returns a `TickPlan`: which
queued jobs the tick takes, which of them expired while waiting, what rides in the tick's
classifier pass (classifications, input moderations, output checks), which generations to
admit in which order, which leave the engine, and whose checks ride in the step. The scheduler
(`Scheduler.run_once`) executes the plan; this split (vLLM's `schedule()` / `execute_model()`)
lets the decisions be tested on data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Queued:
    """A job in the queue."""

    key: int
    deadline: float | None  # time.monotonic() after which nobody waits for the answer
    cancelled: bool
    items: int  # classification items; a generation counts as one
    generation: bool
    moderated_input: bool = False  # a generation whose input is classified before it runs


@dataclass(frozen=True)
class Held:
    """A generation the scheduler holds: running in the engine, waiting for slots, or its
    finished answer waiting for its output check."""

    key: int
    deadline: float | None
    cancelled: bool
    check_due: bool = False  # running, checked as it grows, with tokens due for a check


@dataclass(frozen=True)
class TickState:
    now: float
    queued: Sequence[Queued]  # in queue order (a prefix is enough: see `take`)
    running: Sequence[Held] = ()
    slot_wait: Sequence[Held] = ()
    output_checks: Sequence[Held] = ()
    max_items_per_pass: int = 256


@dataclass(frozen=True)
class TickPlan:
    take: int  # queued jobs the tick takes, from the front of the queue
    expired: tuple[int, ...] = ()  # taken jobs whose deadline passed while they waited: fail
    classify: tuple[int, ...] = ()  # taken classifications, in the classifier pass in order
    moderate_inputs: tuple[int, ...] = ()  # taken generations whose input rides in the pass
    output_checks: tuple[int, ...] = ()  # finished answers whose output check rides in the pass
    # Generations to admit, in order: those waiting for slots first, then the taken ones (an
    # input the pass flags is refused instead).
    admit: tuple[int, ...] = ()
    stop: tuple[int, ...] = ()  # running generations whose caller left: out of the engine
    stop_expired: tuple[int, ...] = ()  # running generations past their deadline: out, failed
    unwait_expired: tuple[int, ...] = ()  # generations past their deadline waiting for slots
    step_checks: tuple[int, ...] = ()  # running answers whose checks ride in the engine step

    @property
    def runs_classifier(self) -> bool:
        return bool(self.classify or self.moderate_inputs or self.output_checks)


def take_count(queued: Sequence[Queued], max_items: int) -> int:
    """Queued jobs for one tick: up to `max_items` classification items, and at least one job
    (a batch larger than the limit still runs, alone)."""
    taken = items = 0
    for job in queued:
        if taken and items >= max_items:
            break
        taken += 1
        items += job.items
    return taken


def plan_tick(state: TickState) -> TickPlan:
    """The tick's decisions (see the module's docstring); cancelled work is dropped silently,
    expired work is failed."""
    now = state.now

    def expired(job: Queued | Held) -> bool:
        return job.deadline is not None and now >= job.deadline

    take = take_count(state.queued, state.max_items_per_pass)
    taken = state.queued[:take]
    live = [j for j in taken if not j.cancelled and not expired(j)]
    stopping = [h for h in state.running if h.cancelled or expired(h)]
    stopped = {h.key for h in stopping}
    waiting = [h for h in state.slot_wait if not h.cancelled]
    new_generations = [j.key for j in live if j.generation]
    return TickPlan(
        take=take,
        expired=tuple(j.key for j in taken if not j.cancelled and expired(j)),
        classify=tuple(j.key for j in live if not j.generation),
        moderate_inputs=tuple(j.key for j in live if j.generation and j.moderated_input),
        output_checks=tuple(h.key for h in state.output_checks if not h.cancelled),
        admit=(*(h.key for h in waiting if not expired(h)), *new_generations),
        stop=tuple(h.key for h in stopping if h.cancelled),
        stop_expired=tuple(h.key for h in stopping if not h.cancelled),
        unwait_expired=tuple(h.key for h in waiting if expired(h)),
        step_checks=tuple(h.key for h in state.running if h.check_due and h.key not in stopped),
    )


def has_slots_for_checks(free_slots: int, waiting: int) -> bool:
    """Whether a generation checked as it grows may enter the engine now: its checks hold a
    slot of their own as long as the answer runs, so it needs its sequence's slot too, or two
    waiting generations could each hold one slot and wait for the other's forever."""
    return free_slots - waiting >= 2


def gather_seconds(
    *, now: float, since: float | None, items: int, full: int, wait: float, busy: bool
) -> float:
    """How long the next tick should wait for more requests before its classifier pass (0: run
    now): until `full` items are queued, at most `wait` seconds after `since` (the later of the
    oldest queued request's arrival and the end of the last tick). Never while generations run
    (their next token must not wait) or with nothing queued.

    Why from the last tick's end: with many callers, requests come in waves (each caller sends
    its next request when its answer is back), and the wave answered by the last pass is on
    its way back while the other waits in the queue; a pass that starts at once takes half
    the callers. A pass costs a fixed part plus a part per text, so fuller passes serve more
    texts per second (`--batch-wait-ms`, docs/benchmarks.md).
    """
    if wait <= 0 or busy or since is None or items >= full:
        return 0.0
    return max(0.0, since + wait - now)
