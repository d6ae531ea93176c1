"""ModerateStream's checks on the scheduler's tick (serving/answer_checks), with the real
engine on the demo checkpoint: a check rides in the generation step's forward pass, several
streams share one pass, a tick answers a complete answer at once, and a cancelled check frees
its slot even when nothing else is running."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moderation.core.chat import ChatMessage
from moderation.core.decision import ClassifyItem
from moderation.core.generation import GenerateOptions, GenerationResult
from moderation.core.policy import Role
from moderation.core.prompts import ANSWER_MARKER, encode_text
from moderation.serving.worker import CheckVerdict
from moderation.serving.worker.answer_checks import CheckJob
from moderation.serving.worker.job import Job, Reply
from moderation.serving.worker.scheduler import Scheduler


@dataclass(eq=False)
class Check(CheckJob):
    got: list[CheckVerdict | BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reply = self.got.append


def check(rt: Any, every: int = 4) -> Check:
    planned, _ = rt.classifier.planner.plan_answer_stream(
        ClassifyItem(ANSWER_MARKER, role=Role.OUTPUT, user_prompt="Hi?", threshold=1.0)
    )
    return Check(planned=planned, every=every)


def test_checks_ride_in_the_generation_step(demo_runtime: Any) -> None:
    rt = demo_runtime
    engine = rt.engine
    scheduler = Scheduler(rt)
    free = engine.free_slots
    prep = rt.generator.prepare(
        [ChatMessage("user", "Tell me a story")], GenerateOptions(max_new_tokens=6)
    )
    got: list[Reply] = []
    gen = Job.generate(prep, got.append, stream=True)
    a, b = check(rt), check(rt)
    scheduler.submit(gen)
    for c in (a, b):
        scheduler.open_check(c)
    scheduler.run_once()  # the generation's pre-fill; both checks open a slot each
    assert engine.free_slots == free - 3
    ids = encode_text(rt.tokenizer, "Once upon a time there was a small village by the sea.")
    scheduler.feed(a, ids[:4], False)
    scheduler.feed(b, ids[:3], False)  # fewer than `every`: not due
    passes, before = engine.stats.forward_passes, len(got)
    scheduler.run_once()
    assert engine.stats.forward_passes == passes + 1  # one pass: a token and a's check
    assert len(got) == before + 1 and [type(v) for v in a.got] == [CheckVerdict] and not b.got
    scheduler.feed(b, ids[3:8], False)
    scheduler.feed(a, ids[4:9], True)  # complete: 5 left, checked 4 then 1
    passes = engine.stats.forward_passes
    scheduler.run_once()
    assert engine.stats.forward_passes == passes + 1  # both checks and the step: one pass
    assert len(a.got) == 2 and len(b.got) == 1
    scheduler.run_once()
    last = a.got[-1]
    assert isinstance(last, CheckVerdict) and last.complete and last.checked_tokens == 9
    while scheduler.has_work and not isinstance(got[-1], GenerationResult):
        scheduler.run_once()
    scheduler.cancel(b)
    assert scheduler.has_work  # a cancelled check is work: its slot must be freed
    scheduler.run_once()
    assert engine.free_slots == free and not scheduler.has_work


def test_a_check_that_covered_everything_answers_done_at_once(demo_runtime: Any) -> None:
    rt = demo_runtime
    scheduler = Scheduler(rt)
    job = check(rt, every=3)
    scheduler.open_check(job)
    ids = encode_text(rt.tokenizer, "A short and kind answer.")[:3]
    scheduler.feed(job, ids, False)
    scheduler.run_once()
    assert len(job.got) == 1 and not job.got[0].complete  # type: ignore[union-attr]
    scheduler.feed(job, [], True)  # done, nothing new: the last verdict was on all of it
    assert scheduler.has_work
    scheduler.run_once()
    last = job.got[-1]
    assert isinstance(last, CheckVerdict) and last.complete and last.checked_tokens == 3
    assert not scheduler.has_work
