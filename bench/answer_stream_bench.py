"""ModerateStream: checking another LLM's answer as it arrives vs re-classifying the growing
answer vs NeMo-style chunks, on 2,000-token answers, in one run (the ~60M bench model).

One answer of --tokens (default 2000) tokens, after a user prompt, three ways:

- incremental (ModerateStream, issue #22): the scheduler's own path (`AnswerChecks` riding the
  tick's engine step): every --every (16) tokens the new tokens go into the answer's check
  slot and the closer + labels are scored; a check is one scheduler tick, timed;
- re-classify: every --every tokens the caller sends the answer so far to Classify (planned
  and scored from its text, the policy prefix reused), what a caller without ModerateStream
  does;
- NeMo-style: every 200 tokens, the 200-token chunk with the 50 tokens before it classified
  whole (NeMo Guardrails' streaming output rails: chunk_size 200, context_size 50).

Then --streams (64) answers checked concurrently: one tick checks every stream's next 16
tokens in one pass; compared with 64 single-stream ticks. The front's incremental tokenizing
(`AnswerTokens`, on the planning threads) of the answer's text in 4-character pieces is timed
too. Targets: time per check flat as the answer grows (the median of the last 10 checks within
1.5x of the first 10's), >= 5x less total check time than re-classifying, 64 streams batched.

    python bench/answer_stream_bench.py [--tokens N] [--every N] [--streams N] [--threads N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_checkpoint, machine
from moderation.core.answer_text import AnswerTokens
from moderation.core.decision import ClassifyItem
from moderation.core.policy import Role
from moderation.core.prompts import ANSWER_MARKER, encode_text
from moderation.runtime import Runtime, load_runtime
from moderation.serving.worker import CheckVerdict
from moderation.serving.worker.answer_checks import CheckJob
from moderation.serving.worker.scheduler import Scheduler

PROMPT = "Write a long, careful answer about the history of bridges."
WORDS = [
    "the",
    "bridge",
    "river",
    "stone",
    "arch",
    "iron",
    "steel",
    "cable",
    "span",
    "engineers",
    "built",
    "century",
    "city",
    "road",
    "traffic",
    "load",
    "tension",
    "compression",
    "design",
    "tower",
    "deck",
    "water",
    "crossing",
    "ancient",
    "roman",
    "modern",
    "suspension",
    "beam",
    "truss",
    "concrete",
    "wind",
    "safety",
    "inspection",
    "repair",
    "history",
    "famous",
    "longest",
]


@dataclass(eq=False)
class _Job(CheckJob):
    verdicts: list[CheckVerdict] | None = None

    def emit(self, event: CheckVerdict | BaseException) -> None:  # no reply callback here
        if isinstance(event, BaseException):
            raise event
        assert self.verdicts is not None
        self.verdicts.append(event)


def answer_text(rt: Runtime, tokens: int) -> str:
    """A text of about `tokens` tokens (cut at a word)."""
    rng = random.Random(0)
    words: list[str] = []
    while len(encode_text(rt.tokenizer, " ".join(words))) < tokens:
        words += [rng.choice(WORDS) for _ in range(50)]
        words[-1] += "."
    while len(encode_text(rt.tokenizer, " ".join(words))) > tokens:
        words.pop()
    return " ".join(words)


def open_jobs(rt: Runtime, scheduler: Scheduler, n: int, every: int) -> list[_Job]:
    planned, _ = rt.classifier.planner.plan_answer_stream(
        ClassifyItem(ANSWER_MARKER, role=Role.OUTPUT, user_prompt=PROMPT, threshold=1.0)
    )
    jobs = [_Job(planned=planned, every=every, verdicts=[]) for _ in range(n)]
    for job in jobs:
        scheduler.open_check(job)
    scheduler.run_once()  # admits them (opens their check slots)
    return jobs


def incremental(rt: Runtime, ids: list[int], every: int) -> list[float]:
    """Seconds of each check: one scheduler tick after `every` more tokens arrived."""
    scheduler = Scheduler(rt)
    (job,) = open_jobs(rt, scheduler, 1, every)
    times = []
    for at in range(0, len(ids), every):
        chunk = ids[at : at + every]
        scheduler.feed(job, chunk, at + every >= len(ids))
        t0 = time.perf_counter()
        scheduler.run_once()
        times.append(time.perf_counter() - t0)
    assert job.verdicts and job.verdicts[-1].complete
    return times


def reclassify(rt: Runtime, text: str, ids: list[int], every: int) -> list[float]:
    """Seconds of each Classify of the answer so far (from its text, as a caller sends it)."""
    times = []
    for at in range(every, len(ids) + every, every):
        so_far = rt.tokenizer.decode(ids[:at])
        item = ClassifyItem(so_far, role=Role.OUTPUT, user_prompt=PROMPT, threshold=1.0)
        t0 = time.perf_counter()
        rt.classifier.classify_many([item])
        times.append(time.perf_counter() - t0)
    return times


def nemo(rt: Runtime, ids: list[int], chunk: int = 200, context: int = 50) -> list[float]:
    """Seconds of each NeMo-style check: a chunk and the context before it, classified whole."""
    times = []
    for at in range(0, len(ids), chunk):
        text = rt.tokenizer.decode(ids[max(0, at - context) : at + chunk])
        item = ClassifyItem(text, role=Role.OUTPUT, user_prompt=PROMPT, threshold=1.0)
        t0 = time.perf_counter()
        rt.classifier.classify_many([item])
        times.append(time.perf_counter() - t0)
    return times


def concurrent(rt: Runtime, ids: list[int], every: int, streams: int) -> tuple[float, float]:
    """(seconds of one tick checking `streams` streams' next tokens, of one single-stream
    tick), each the median over the answer's first 10 chunks."""
    scheduler = Scheduler(rt)
    jobs = open_jobs(rt, scheduler, streams, every)
    batched = []
    passes = rt.engine.stats.forward_passes
    for at in range(0, 10 * every, every):
        for job in jobs:
            scheduler.feed(job, ids[at : at + every], False)
        t0 = time.perf_counter()
        scheduler.run_once()
        batched.append(time.perf_counter() - t0)
    assert all(len(j.verdicts or ()) == 10 for j in jobs), "a tick must check every stream"
    assert rt.engine.stats.forward_passes - passes == 10, "a tick's checks share one pass"
    for job in jobs:
        scheduler.cancel(job)
    scheduler.run_once()
    single = incremental(rt, ids[: 10 * every], every)
    return statistics.median(batched), statistics.median(single)


def tokenize(rt: Runtime, text: str, piece: int = 4) -> tuple[float, int]:
    answer = AnswerTokens(rt.tokenizer)
    t0 = time.perf_counter()
    n = 0
    for at in range(0, len(text), piece):
        n += len(answer.push(text[at : at + piece]))
    n += len(answer.finish())
    return time.perf_counter() - t0, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--every", type=int, default=16)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ns = parser.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench_checkpoint(Path(tmp))
        rt = load_runtime(folder, device="cpu", dtype="float32", max_batch_size=ns.streams + 1)
        rt.classifier.warm_up()
        text = answer_text(rt, ns.tokens)
        ids = encode_text(rt.tokenizer, text)
        print(f"{machine()}; answer {len(ids)} tokens, a check every {ns.every}", flush=True)
        seconds, n = tokenize(rt, text)
        assert n == len(ids)
        print(f"front: incremental tokenizing in 4-character pieces: {seconds * 1e3:.1f} ms")
        incremental(rt, ids[: 4 * ns.every], ns.every)  # warm-up
        inc = incremental(rt, ids, ns.every)
        first, last = statistics.median(inc[:10]), statistics.median(inc[-11:-1])
        print(f"incremental: {len(inc)} checks, {sum(inc) * 1e3:.0f} ms in all; "
              f"first 10 {first * 1e3:.2f} ms, last 10 {last * 1e3:.2f} ms per check: "
              f"{last / first:.2f}x (target <= 1.5)", flush=True)  # fmt: skip
        re = reclassify(rt, text, ids, ns.every)
        print(f"re-classify: {len(re)} checks, {sum(re) * 1e3:.0f} ms in all; first 10 "
              f"{statistics.median(re[:10]) * 1e3:.2f} ms, last 10 "
              f"{statistics.median(re[-10:]) * 1e3:.2f} ms per check", flush=True)  # fmt: skip
        ne = nemo(rt, ids)
        print(f"NeMo-style (200 + 50 context): {len(ne)} checks, {sum(ne) * 1e3:.0f} ms in all, "
              f"{statistics.median(ne) * 1e3:.2f} ms per check", flush=True)  # fmt: skip
        print(f"re-classify / incremental, total check time: {sum(re) / sum(inc):.1f}x "
              "(target >= 5)")  # fmt: skip
        print(f"NeMo-style / incremental, total check time: {sum(ne) / sum(inc):.2f}x "
              f"(with {len(inc) / len(ne):.1f}x as many verdicts)")  # fmt: skip
        batched, single = concurrent(rt, ids, ns.every, ns.streams)
        print(f"{ns.streams} streams: one tick checks them all in {batched * 1e3:.1f} ms vs "
              f"{single * 1e3:.2f} ms for one stream's tick: {ns.streams * single / batched:.1f}x "
              f"less than {ns.streams} ticks apart", flush=True)  # fmt: skip


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
