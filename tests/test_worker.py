"""The model worker's scheduling, with test doubles of the engine, classifier and tokenizer so
that every interleaving is forced, not hoped for (the server tests run the real engine)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from model import GenerationRequest, TokenEvent
from model.errors import RequestError
from model.stats import EngineStats
from moderation.core.decision import Classification, ClassifyItem
from moderation.core.errors import InvalidArgument
from moderation.core.generation import GenerateOptions, GenerationResult, PreparedGeneration
from moderation.core.guarded import GuardedGenerator
from moderation.core.policy import Role
from moderation.runtime import Runtime
from moderation.serving.metrics import Metrics
from moderation.serving.worker import DeadlineExpiredError, QueueFullError, WorkerStoppedError
from moderation.serving.worker.worker_thread import WorkerThread

T = TypeVar("T")
EOS = 2


class FakeTokenizer:
    eos_id = EOS

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids if t != EOS)


def verdict(text: str, flagged: bool) -> Classification:
    p = 0.9 if flagged else 0.1
    return Classification(
        category="illegal_activities" if flagged else "acceptable", flagged=flagged,
        scores={"illegal_activities": p, "acceptable": 1 - p}, categories={}, paper_scores={},
        paper_category="", policy="paper", model="fake", prompt_tokens=len(text),
    )  # fmt: skip


class FakeOutputStream:
    def __init__(self) -> None:
        self.checked: list[int] = []


class FakeClassifier:
    """Plans an item as itself; flags texts starting with "bad" (and every answer when
    `flag_outputs`); records each pass. `gate` holds the next pass until set.

    Answers are checked as they grow (a scripted check: flags an answer once it has more than
    `flag_after` tokens); each check pass is recorded as (tokens each check covers, whether
    the engine was still generating)."""

    def __init__(self) -> None:
        self.passes: list[list[str]] = []
        self.planned: list[str] = []  # texts planned on the worker's thread
        self.in_pass = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.flag_outputs = False
        self.flag_after: int | None = None
        self.engine: FakeEngine | None = None
        self.check_passes: list[tuple[list[int], bool]] = []
        self.open_streams: set[FakeOutputStream] = set()

    def open_output_stream(self, prep: Any) -> FakeOutputStream:
        stream = FakeOutputStream()
        self.open_streams.add(stream)
        return stream

    def close_output_stream(self, stream: FakeOutputStream) -> None:
        self.open_streams.discard(stream)

    def check_outputs(
        self,
        checks: Sequence[tuple[FakeOutputStream, Sequence[int]]],
        *,
        run: Callable[[list[Any]], list[list[float]]] | None = None,
    ) -> list[Classification]:
        assert self.engine is not None
        self.check_passes.append(([len(t) for _, t in checks], bool(self.engine.running)))
        if run is not None:  # the checks ride in an engine step: take that step
            run([])
        out = []
        for stream, tokens in checks:
            stream.checked.extend(tokens)
            flagged = self.flag_outputs or (
                self.flag_after is not None and len(stream.checked) > self.flag_after
            )
            out.append(verdict("x" * len(stream.checked), flagged))
        return out

    def plan(self, item: ClassifyItem) -> ClassifyItem:
        self.planned.append(item.text)
        if not item.text:
            raise InvalidArgument("text", "must not be empty")
        return item

    def plan_output(self, prep: Any, answer: str) -> ClassifyItem:
        return self.plan(prep.output_item(answer))

    def run(self, planned: Sequence[ClassifyItem]) -> list[Classification]:
        self.in_pass.set()
        assert self.gate.wait(10)
        self.passes.append([p.text for p in planned])
        if any(p.text == "boom" for p in planned):
            raise RuntimeError("the model fell over")
        return [
            verdict(
                p.text, p.text.startswith("bad") or (self.flag_outputs and p.role == Role.OUTPUT)
            )
            for p in planned
        ]

    def classify_many(self, items: Sequence[ClassifyItem]) -> list[Classification]:
        raise AssertionError("the worker must batch output moderation, not classify inline")


class FakeEngine:
    """Continuous batching in miniature: up to max_batch_size sequences, one token each per step
    (tokens 3, 4, 5, ...), finishing by length. Records which sequences ran in each step."""

    max_batch_size = 4

    def __init__(self, step_delay: float = 0.0):
        self.step_delay = step_delay
        self.waiting: deque[tuple[int, GenerationRequest]] = deque()
        self.running: dict[int, tuple[GenerationRequest, list[int]]] = {}
        self.steps: list[set[int]] = []
        self.cancelled: list[int] = []
        self.added: list[int] = []
        self.stats = EngineStats()
        self._ids = itertools.count()
        self.classifier: FakeClassifier | None = None

    def add_request(self, request: GenerationRequest) -> int:
        if len(request.prompt) > 100:
            raise RequestError("prompt + max_new_tokens: 101 tokens exceed the context of 100")
        rid = next(self._ids)
        self.waiting.append((rid, request))
        self.added.append(rid)
        return rid

    def cancel(self, rid: int) -> bool:
        self.cancelled.append(rid)
        self.waiting = deque(w for w in self.waiting if w[0] != rid)
        return self.running.pop(rid, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def free_slots(self) -> int:
        checks = len(self.classifier.open_streams) if self.classifier else 0
        return self.max_batch_size - len(self.running) - checks

    @property
    def cache(self) -> Any:
        """What the cache metrics read: tokens per slot (prompt and generated), the window."""
        lengths = [len(r.prompt) + len(out) for r, out in self.running.values()]
        return SimpleNamespace(window=64, lengths=lengths + [0] * self.max_batch_size)

    def step_with_checks(
        self, checks: Sequence[Any], *, relative: bool = False
    ) -> tuple[list[TokenEvent], list[list[float]]]:
        return self.step(), [[] for _ in checks]

    def step(self) -> list[TokenEvent]:
        while self.waiting and len(self.running) < self.max_batch_size:
            rid, request = self.waiting.popleft()
            self.running[rid] = (request, [])
        self.steps.append(set(self.running))
        time.sleep(self.step_delay)
        events = []
        for rid, (request, generated) in list(self.running.items()):
            generated.append(3 + len(generated))
            done = len(generated) >= request.max_new_tokens
            if done:
                del self.running[rid]
            events.append(TokenEvent(rid, generated[-1], done, "length" if done else None))
        self.stats.tokens_computed += len(events)
        return events


def make_worker(
    step_delay: float = 0.0, **kwargs: Any
) -> tuple[WorkerThread, FakeEngine, FakeClassifier]:
    engine, classifier, tokenizer = FakeEngine(step_delay), FakeClassifier(), FakeTokenizer()
    engine.classifier, classifier.engine = classifier, engine
    generator = GuardedGenerator(engine, tokenizer, classifier, model_id="fake")  # type: ignore[arg-type]
    runtime = Runtime("fake", False, "cpu", "float32", engine, tokenizer, classifier, generator)  # type: ignore[arg-type]
    worker = WorkerThread(runtime, Metrics.create(), **kwargs)
    worker.start()
    return worker, engine, classifier


@pytest.fixture
def parts() -> Any:
    worker, engine, classifier = make_worker()
    yield worker, engine, classifier
    classifier.gate.set()
    worker.stop(5)


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), 20))


def prep(
    text: str = "hi", *, max_new_tokens: int = 5, prompt_len: int = 3, **options: Any
) -> PreparedGeneration:
    o = GenerateOptions(max_new_tokens=max_new_tokens, **options)
    item = ClassifyItem(text, role=Role.INPUT) if o.moderate_input else None
    return PreparedGeneration(o, list(range(10, 10 + prompt_len)), text, item)


async def collect(worker: WorkerThread, p: PreparedGeneration, **kw: Any) -> list[Any]:
    return [e async for e in worker.generate(p, stream=True, **kw)]


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


# ------------------------------------------------------------------- classification


def test_concurrent_callers_share_one_classifier_pass(parts: Any) -> None:
    worker, _, classifier = parts

    async def scenario() -> list[list[Classification]]:
        classifier.gate.clear()
        first = asyncio.create_task(worker.classify([ClassifyItem("first")]))
        await until(classifier.in_pass.is_set)  # the worker is busy with "first"
        rest = [asyncio.create_task(worker.classify([ClassifyItem(f"t{i}")])) for i in range(10)]
        batch = asyncio.create_task(worker.classify([ClassifyItem("b0"), ClassifyItem("bad1")]))
        await until(lambda: worker.queue_depth == 11)
        classifier.gate.set()
        return await asyncio.gather(first, *rest, batch)

    results = run(scenario)
    assert classifier.passes == [["first"], [*(f"t{i}" for i in range(10)), "b0", "bad1"]]
    # Each caller gets its own results back, in order.
    assert [r[0].prompt_tokens for r in results[1:11]] == [len(f"t{i}") for i in range(10)]
    assert [r.flagged for r in results[-1]] == [False, True]


def test_a_pass_wakes_the_event_loop_once_for_all_its_answers(parts: Any) -> None:
    worker, _, classifier = parts
    wakeups: list[int] = []

    async def scenario() -> list[list[Classification]]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            wakeups.append(1)
            return real(*args, **kwargs)

        classifier.gate.clear()
        first = asyncio.create_task(worker.classify([ClassifyItem("first")]))
        await until(classifier.in_pass.is_set)
        rest = [asyncio.create_task(worker.classify([ClassifyItem(f"t{i}")])) for i in range(12)]
        await until(lambda: worker.queue_depth == 12)
        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        classifier.gate.set()
        return await asyncio.gather(first, *rest)

    results = run(scenario)
    assert len(results) == 13 and all(len(r) == 1 for r in results)
    # The first pass's answer and then the twelve of the second: one wake-up per pass, not
    # one per caller.
    assert len(wakeups) == 2


def test_a_cancelled_queued_call_is_dropped_unrun(parts: Any) -> None:
    worker, _, classifier = parts

    async def scenario() -> None:
        classifier.gate.clear()
        busy = asyncio.create_task(worker.classify([ClassifyItem("busy")]))
        await until(classifier.in_pass.is_set)
        doomed = asyncio.create_task(worker.classify([ClassifyItem("doomed")]))
        kept = asyncio.create_task(worker.classify([ClassifyItem("kept")]))
        await until(lambda: worker.queue_depth == 2)
        doomed.cancel()
        await until(lambda: worker.queue_depth == 1)  # left the queue at once
        classifier.gate.set()
        await asyncio.gather(busy, kept)

    run(scenario)
    assert classifier.passes == [["busy"], ["kept"]]


def test_a_call_whose_deadline_passed_in_the_queue_is_not_run(parts: Any) -> None:
    worker, _, classifier = parts

    async def scenario() -> None:
        classifier.gate.clear()
        busy = asyncio.create_task(worker.classify([ClassifyItem("busy")]))
        await until(classifier.in_pass.is_set)
        late = asyncio.create_task(
            worker.classify([ClassifyItem("late")], deadline=time.monotonic() + 0.01)
        )
        await asyncio.sleep(0.05)
        classifier.gate.set()
        await busy
        with pytest.raises(DeadlineExpiredError):
            await late

    run(scenario)
    assert classifier.passes == [["busy"]]


def test_a_full_queue_refuses_new_work() -> None:
    worker, _, classifier = make_worker(max_queue=2)

    async def scenario() -> None:
        classifier.gate.clear()
        calls = [asyncio.create_task(worker.classify([ClassifyItem("busy")]))]
        await until(classifier.in_pass.is_set)  # taken off the queue: the queue is empty
        calls += [asyncio.create_task(worker.classify([ClassifyItem(f"q{i}")])) for i in (1, 2)]
        await until(lambda: worker.queue_depth == 2)
        with pytest.raises(QueueFullError, match="queue is full"):
            await worker.classify([ClassifyItem("one too many")])
        classifier.gate.set()
        await asyncio.gather(*calls)
        assert (await worker.classify([ClassifyItem("room again")]))[0].model == "fake"

    try:
        run(scenario)
    finally:
        classifier.gate.set()
        worker.stop(5)


def test_a_failing_pass_fails_its_callers_and_the_worker_carries_on(parts: Any) -> None:
    worker, _, _ = parts

    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="fell over"):
            await worker.classify([ClassifyItem("boom")])
        assert (await worker.classify([ClassifyItem("fine")]))[0].flagged is False

    run(scenario)


def test_stop_finishes_queued_work_then_refuses_new_work(parts: Any) -> None:
    worker, _, classifier = parts

    async def scenario() -> None:
        classifier.gate.clear()
        calls = [asyncio.create_task(worker.classify([ClassifyItem(f"t{i}")])) for i in range(3)]
        await until(classifier.in_pass.is_set)
        stopping = asyncio.create_task(asyncio.to_thread(worker.stop, 5))
        await asyncio.sleep(0.02)
        with pytest.raises(WorkerStoppedError):
            await worker.classify([ClassifyItem("too late")])
        classifier.gate.set()
        assert len(await asyncio.gather(*calls)) == 3
        await stopping

    run(scenario)


# ---------------------------------------------------------------------- generation


def test_deltas_are_streamed_and_join_into_the_text(parts: Any) -> None:
    worker, engine, _ = parts
    events = run(lambda: collect(worker, prep(max_new_tokens=6)))
    result = events[-1]
    assert isinstance(result, GenerationResult) and result.finish_reason == "length"
    assert all(isinstance(e, str) for e in events[:-1])
    assert "".join(events[:-1]) == result.text == "defghi"  # tokens 3..8
    assert result.completion_tokens == 6 and not engine.has_unfinished()


def test_sequences_join_and_leave_the_running_batch_between_steps() -> None:
    worker, engine, _ = make_worker(step_delay=0.003)

    async def scenario() -> tuple[list[Any], list[Any]]:
        long = asyncio.create_task(collect(worker, prep("long", max_new_tokens=40)))
        await until(lambda: len(engine.steps) >= 5)  # the first is well under way
        short = await collect(worker, prep("short", max_new_tokens=3))
        return await long, short

    try:
        long, short = run(scenario)
    finally:
        worker.stop(5)
    assert long[-1].completion_tokens == 40 and short[-1].completion_tokens == 3
    shared = [s for s in engine.steps if s == {0, 1}]
    assert len(shared) == 3  # the short one joined mid-way, ran 3 steps beside the long one...
    assert engine.steps[-1] == {0}  # ...and left while the long one went on
    assert len(engine.steps) == 40  # the long one never waited for the short one


def test_a_cancelled_generation_leaves_the_engine() -> None:
    worker, engine, _ = make_worker(step_delay=0.002)

    async def scenario() -> None:
        task = asyncio.create_task(collect(worker, prep(max_new_tokens=10_000)))
        await until(lambda: len(engine.steps) >= 3)
        task.cancel()
        await until(lambda: not engine.has_unfinished())

    try:
        run(scenario)
        steps = len(engine.steps)
        time.sleep(0.05)
    finally:
        worker.stop(5)
    assert engine.cancelled == [0]
    assert len(engine.steps) == steps < 1000  # no step ran after it left


def test_a_generation_past_its_deadline_is_stopped() -> None:
    worker, engine, _ = make_worker(step_delay=0.002)

    async def scenario() -> None:
        with pytest.raises(DeadlineExpiredError):
            await collect(worker, prep(max_new_tokens=10_000), deadline=time.monotonic() + 0.05)

    try:
        run(scenario)
    finally:
        worker.stop(5)
    assert engine.cancelled == [0] and not engine.has_unfinished()
    assert len(engine.steps) < 1000


def test_input_moderation_shares_the_pass_with_classifications(parts: Any) -> None:
    worker, engine, classifier = parts

    async def scenario() -> tuple[list[Any], list[Any], list[Classification]]:
        classifier.gate.clear()
        busy = asyncio.create_task(worker.classify([ClassifyItem("busy")]))
        await until(classifier.in_pass.is_set)
        ok = asyncio.create_task(collect(worker, prep("hello", moderate_input=True)))
        bad = asyncio.create_task(collect(worker, prep("bad idea", moderate_input=True)))
        other = asyncio.create_task(worker.classify([ClassifyItem("other")]))
        await until(lambda: worker.queue_depth == 3)
        classifier.gate.set()
        await busy
        return await ok, await bad, await other

    ok, bad, _ = run(scenario)
    assert classifier.passes == [["busy"], ["other", "hello", "bad idea"]]
    assert classifier.planned == []  # the inputs ran as planned at the door, not planned again
    assert ok[-1].input_moderation.flagged is False and ok[-1].finish_reason == "length"
    refused = bad[-1]
    assert refused.refused and refused.finish_reason == "input_flagged"
    assert refused.completion_tokens == 0 and bad == [refused]
    assert engine.added == [0]  # the flagged prompt never reached the engine


def test_output_moderation_is_batched_and_nothing_unchecked_is_sent(parts: Any) -> None:
    worker, _, classifier = parts
    classifier.flag_outputs = True

    async def scenario() -> tuple[list[Any], list[Classification]]:
        gen = asyncio.create_task(collect(worker, prep("q", moderate_output=True)))
        return await gen, await worker.classify([ClassifyItem("after")])

    events, _ = run(scenario)
    assert len(events) == 1  # no delta before the check, none after a flagged answer
    result = events[0]
    assert result.refused and result.finish_reason == "output_flagged" and result.text == ""
    assert result.output_moderation.flagged and result.completion_tokens == 5
    assert result.released_tokens == 0
    # The answer (5 tokens, fewer than a check's 16) went through one check, at its end.
    assert classifier.check_passes == [([5], False)]
    assert not classifier.open_streams  # its check slot was given back


def test_an_engine_refusal_fails_only_that_generation(parts: Any) -> None:
    worker, _, _ = parts

    async def scenario() -> list[Any]:
        with pytest.raises(InvalidArgument) as err:
            await collect(worker, prep(prompt_len=101))
        assert err.value.field == "messages"
        return await collect(worker, prep(max_new_tokens=2))

    assert run(scenario)[-1].completion_tokens == 2


# ------------------------------------------------------- output checked as it grows


def test_checked_chunks_are_released_before_the_answer_ends(parts: Any) -> None:
    worker, _, classifier = parts
    events = run(lambda: collect(worker, prep("q", moderate_output=True, stream_check_tokens=2,
                                              max_new_tokens=7)))  # fmt: skip
    *deltas, result = events
    # Tokens 3..9 are "defghij": released two tokens at a time, each after its check.
    assert deltas == ["de", "fg", "hi", "j"]
    assert "".join(deltas) == result.text == "defghij"
    assert not result.refused and result.finish_reason == "length"
    assert result.released_tokens == result.completion_tokens == 7
    # The first checks ran while the answer was still being generated; the tail after it.
    assert classifier.check_passes == [([2], True), ([2], True), ([2], True), ([1], False)]
    assert not classifier.open_streams


def test_a_flagging_check_stops_generation_and_releases_nothing_after_it(parts: Any) -> None:
    worker, engine, classifier = parts
    classifier.flag_after = 4  # the check covering tokens 5 and 6 flags the answer
    events = run(lambda: collect(worker, prep("q", moderate_output=True, stream_check_tokens=2,
                                              max_new_tokens=50)))  # fmt: skip
    *deltas, result = events
    assert deltas == ["de", "fg"]  # what the two acceptable checks covered, nothing after
    assert result.refused and result.finish_reason == "output_flagged" and result.text == ""
    assert result.output_moderation.flagged
    assert result.released_tokens == 4
    assert result.completion_tokens == 6  # generation stopped at the flagging check
    assert engine.cancelled and not engine.running  # the sequence left the engine
    assert not classifier.open_streams


def test_concurrent_answers_share_one_check_pass(parts: Any) -> None:
    worker, _, classifier = parts

    async def scenario() -> list[list[Any]]:
        return await asyncio.gather(*(
            collect(worker, prep(f"q{i}", moderate_output=True, stream_check_tokens=3,
                                 max_new_tokens=6))
            for i in range(2)
        ))  # fmt: skip

    results = run(scenario)
    assert [r[-1].text for r in results] == ["defghi", "defghi"]
    assert [r[:-1] for r in results] == [["def", "ghi"], ["def", "ghi"]]
    # Both answers' checks ran together, in one pass per tick.
    assert classifier.check_passes == [([3, 3], True), ([3, 3], False)]


def test_unary_generate_stops_at_the_first_flagging_check(parts: Any) -> None:
    worker, _, classifier = parts
    classifier.flag_after = 0

    async def scenario() -> list[Any]:
        p = prep("q", moderate_output=True, stream_check_tokens=4, max_new_tokens=100)
        return [e async for e in worker.generate(p, stream=False)]

    [result] = run(scenario)
    assert result.finish_reason == "output_flagged" and result.completion_tokens == 4
    assert result.released_tokens == 0


def test_answers_wait_for_a_slot_for_their_checks(parts: Any) -> None:
    worker, engine, classifier = parts  # 4 slots: two checked answers at a time

    async def scenario() -> list[list[Any]]:
        return await asyncio.gather(*(
            collect(worker, prep(f"q{i}", moderate_output=True, max_new_tokens=3))
            for i in range(3)
        ))  # fmt: skip

    results = run(scenario)
    assert [r[-1].text for r in results] == ["def"] * 3
    assert max(len(s) for s in engine.steps) == 2  # the third waited: no deadlock, no overlap
    assert not classifier.open_streams


def test_the_watchdog_sees_an_idle_thread_alive_and_a_stuck_pass_stalled(parts: Any) -> None:
    # Issue #19: the in-process worker's sign of life for the watchdog (`last_progress`): now,
    # while it waits for work, however long; the start of its pass while a pass runs.
    worker, _, classifier = parts
    time.sleep(0.3)
    assert time.monotonic() - worker.last_progress < 0.2  # idle for 0.3 s, and not stalled

    async def scenario() -> None:
        classifier.gate.clear()  # the next pass hangs until the gate opens
        job = asyncio.ensure_future(worker.classify([ClassifyItem("stuck")]))
        await until(classifier.in_pass.is_set)
        await asyncio.sleep(0.3)
        assert time.monotonic() - worker.last_progress >= 0.3  # the pass is what stalls
        classifier.gate.set()
        await job

    run(scenario)
