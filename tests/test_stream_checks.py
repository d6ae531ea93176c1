"""Output moderation while the answer is generated, on the real engine (the demo checkpoint,
whose sliding window is 32 tokens): a check after N tokens equals classifying the same answer
tokens from scratch, whatever the chunk size, for answers shorter and longer than the window;
a flagging check stops generation; checks batched together equal checks one at a time."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
import torch

from model import Engine, GenerationRequest, ModelArgs, Prefix, ScoreRequest, StreamCheck
from model.demo import random_weights
from model.errors import RequestError
from model.transformer import Transformer
from moderation.core.chat import ChatMessage
from moderation.core.classifier import Classifier
from moderation.core.decision import Classification
from moderation.core.generation import GenerateOptions, GenerationResult
from moderation.core.policy import Role
from moderation.core.prompts import (
    build_prefix,
    build_prompt_from_tokens,
    checkable_answer_tokens,
    label_continuations,
)
from moderation.serving.worker.worker_thread import WorkerThread

TOL = 1e-4


def output_prompt(
    rt: Any, user_prompt: str = "Tell me a story"
) -> tuple[tuple[int, ...], list[int]]:
    """The output-role prompt up to the answer: (policy prefix, body up to "Answer:")."""
    tok = rt.tokenizer
    policy = rt.classifier.policy(None)
    closer = tok.inst_close()
    body = build_prompt_from_tokens(
        policy, Role.OUTPUT, tok, [], user_prompt_tokens=tok.encode(user_prompt, bos=False)
    ).body
    return build_prefix(policy, Role.OUTPUT, tok), list(body[: -len(closer)])


def answer_tokens(n: int, seed: int) -> list[int]:
    """Plain text token ids (no control ids, no turn markers can form from them)."""
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


def from_scratch(engine: Any, prompt: list[int], labels: Any) -> list[float]:
    """Scores of the labels after a whole prompt, nothing cached."""
    return engine.score_batch([ScoreRequest(prompt, labels)], relative=True)[0]


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("length", [20, 100])  # shorter and longer than the 32-token window
def test_each_check_equals_classifying_the_answer_so_far_from_scratch(
    demo_runtime: Any, chunk: int, length: int
) -> None:
    check_equals_from_scratch(demo_runtime, chunk, length, reuse_prefix=True)


def test_a_stream_without_a_reused_prefix_checks_the_same(demo_runtime: Any) -> None:
    check_equals_from_scratch(demo_runtime, 7, 100, reuse_prefix=False)


def check_equals_from_scratch(rt: Any, chunk: int, length: int, *, reuse_prefix: bool) -> None:
    engine = rt.engine
    prefix, body = output_prompt(rt)
    labels = label_continuations(rt.classifier.policy(None), rt.tokenizer)
    closer = rt.tokenizer.inst_close()
    answer = answer_tokens(length, seed=length + chunk)
    free = engine.free_slots
    if reuse_prefix:
        stream = engine.open_stream(body, engine.prefill_prefix(prefix))
    else:
        stream = engine.open_stream([*prefix, *body])
    assert stream is not None and engine.free_slots == free - 1
    ends = list(range(chunk, length + chunk, chunk))
    try:
        got = [
            engine.check_streams(
                [StreamCheck(stream, answer[end - chunk : end], closer, labels)], relative=True
            )[0]
            for end in ends
        ]
        assert engine.stream_length(stream) == len(prefix) + len(body) + length
    finally:
        assert engine.close_stream(stream)
    assert engine.free_slots == free and not engine.close_stream(stream)
    # From scratch: each answer so far in a whole prompt, nothing cached (batched, to be quick).
    want = engine.score_batch(
        [ScoreRequest([*prefix, *body, *answer[:end], *closer], labels) for end in ends],
        relative=True,
    )
    for end, g, w in zip(ends, got, want, strict=True):
        assert g == pytest.approx(w, abs=TOL), (end, chunk)


def test_checks_of_many_streams_in_one_pass_equal_checks_one_at_a_time(demo_runtime: Any) -> None:
    rt = demo_runtime
    engine = rt.engine
    prefix, body = output_prompt(rt)
    snapshot: Prefix = engine.prefill_prefix(prefix)
    labels = label_continuations(rt.classifier.policy(None), rt.tokenizer)
    closer = rt.tokenizer.inst_close()
    answers = [answer_tokens(n, seed=n) for n in (9, 40, 70)]
    chunks = [3, 16, 5]  # each stream its own pace: uneven chunks share the passes
    together = [engine.open_stream(body, snapshot) for _ in answers]
    alone = [engine.open_stream(body, snapshot) for _ in answers]
    try:
        done = [0] * len(answers)
        passes_before = engine.stats.forward_passes
        rounds = 0
        while any(d < len(a) for d, a in zip(done, answers, strict=True)):
            live = [i for i, a in enumerate(answers) if done[i] < len(a)]
            batch = [
                StreamCheck(together[i], answers[i][done[i] : done[i] + chunks[i]], closer, labels)
                for i in live
            ]
            got = engine.check_streams(batch, relative=True)
            for i, scores in zip(live, got, strict=True):
                single = StreamCheck(alone[i], batch[live.index(i)].tokens, closer, labels)
                assert scores == pytest.approx(
                    engine.check_streams([single], relative=True)[0], abs=TOL
                )
                done[i] += chunks[i]
            rounds += 1
        # One pass per round for the batch, one per check alone.
        checks_alone = sum(-(-len(a) // c) for a, c in zip(answers, chunks, strict=True))
        assert engine.stats.forward_passes - passes_before == rounds + checks_alone
    finally:
        for s in [*together, *alone]:
            assert s is not None and engine.close_stream(s)


def step_and_check(rt: Any, *, fused: bool) -> tuple[list[list[int]], list[list[Any]], int, int]:
    """Three generations and three check streams, each stream checking one generation's own
    tokens every 5, as the service does: with `fused`, each tick's checks ride in its step's
    pass (`step_with_checks`); otherwise a step, then a check pass. The answers (45 tokens)
    and the streams outgrow the 32-token window; one prompt (50 tokens) pre-fills over two
    steps while checks share its passes; one stream's prompt is pre-filled first (too long
    to share a pass). Returns the tokens, each stream's scores, the passes run and the ticks
    whose checks had a step to ride in."""
    engine = rt.engine
    prefix, body = output_prompt(rt)
    snapshot = engine.prefill_prefix(prefix)
    labels = label_continuations(rt.classifier.policy(None), rt.tokenizer)
    closer = rt.tokenizer.inst_close()
    every, new_tokens = 5, 45
    streams = [
        engine.open_stream(body, snapshot),
        engine.open_stream([*prefix, *body]),
        engine.open_stream(body, snapshot),
    ]
    prompts = [answer_tokens(n, seed=200 + n) for n in (5, 12, 50)]
    ids = [
        engine.add_request(GenerationRequest(p, new_tokens, stop_tokens=frozenset()))
        for p in prompts
    ]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    checked = [0] * len(ids)
    scores: list[list[Any]] = [[] for _ in ids]
    passes = engine.stats.forward_passes
    shared = 0
    try:
        while True:
            due = [
                k
                for k, i in enumerate(ids)
                if len(tokens[i]) - checked[k] >= every
                or (len(tokens[i]) == new_tokens and checked[k] < new_tokens)
            ]
            if not due and not engine.has_unfinished():
                break
            checks = [
                StreamCheck(streams[k], tokens[ids[k]][checked[k] :], closer, labels) for k in due
            ]
            shared += bool(checks) and engine.has_unfinished()
            if fused:
                events, got = engine.step_with_checks(checks, relative=True)
            else:
                events = engine.step()
                got = engine.check_streams(checks, relative=True) if checks else []
            for k, c, s in zip(due, checks, got, strict=True):
                checked[k] += len(c.tokens)
                scores[k].append(s)
            for ev in events:
                assert ev.error is None
                tokens[ev.request_id].append(ev.token)
        passes = engine.stats.forward_passes - passes
    finally:
        for stream in streams:
            assert stream is not None and engine.close_stream(stream)
    return [tokens[i] for i in ids], scores, passes, shared


def test_checks_fused_into_a_step_equal_a_step_then_a_check_pass(demo_runtime: Any) -> None:
    apart_tokens, apart_scores, apart_passes, shared = step_and_check(demo_runtime, fused=False)
    fused_tokens, fused_scores, fused_passes, _ = step_and_check(demo_runtime, fused=True)
    assert fused_tokens == apart_tokens  # greedy decoding: exactly the same tokens
    assert all(len(t) == 45 for t in fused_tokens)
    assert [len(s) for s in fused_scores] == [len(s) for s in apart_scores] == [9, 9, 9]
    for fused, apart in zip(fused_scores, apart_scores, strict=True):
        for f, a in zip(fused, apart, strict=True):
            assert f == pytest.approx(a, abs=TOL)
    # Each tick whose checks found a step to ride in saved their pass (the others, after
    # the generations ended, checked alone).
    assert shared >= 9 and apart_passes - fused_passes == shared


def test_a_fused_step_is_one_pass_and_a_tick_without_generation_checks_alone(
    demo_runtime: Any,
) -> None:
    rt = demo_runtime
    engine = rt.engine
    prefix, body = output_prompt(rt)
    labels = label_continuations(rt.classifier.policy(None), rt.tokenizer)
    closer = rt.tokenizer.inst_close()
    stream = engine.open_stream(body, engine.prefill_prefix(prefix))
    assert stream is not None
    rid = engine.add_request(GenerationRequest(answer_tokens(6, 1), 3, stop_tokens=frozenset()))
    try:
        engine.step()  # pre-fill, first token
        passes = engine.stats.forward_passes
        events, scores = engine.step_with_checks(
            [StreamCheck(stream, answer_tokens(4, 2), closer, labels)], relative=True
        )
        assert [e.request_id for e in events] == [rid] and len(scores[0]) == len(labels)
        assert engine.stats.forward_passes == passes + 1
        engine.step()  # the last token: the generation is done
        assert not engine.has_unfinished()
        events, scores = engine.step_with_checks(
            [StreamCheck(stream, answer_tokens(3, 3), closer, labels)], relative=True
        )
        assert events == [] and len(scores) == 1
        assert engine.stats.forward_passes == passes + 3
        with pytest.raises(RequestError):
            engine.step_with_checks([StreamCheck(stream + 999, [5], closer, labels)])
    finally:
        assert engine.close_stream(stream)


def test_checks_too_large_for_the_step_budget_run_in_a_pass_of_their_own() -> None:
    """An engine whose passes hold 8 tokens: a check of 9 (6 new tokens, a 2-token closer, one
    label node) cannot share the step's pass with a decoder, so step_with_checks runs the
    step and the check apart, with the same results."""
    args = ModelArgs(
        dim=64, n_layers=2, head_dim=16, hidden_dim=160, n_heads=4, n_kv_heads=2,
        norm_eps=1e-5, vocab_size=512, sliding_window=16, max_seq_len=4096,
    )  # fmt: skip
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(random_weights(args, seed=5), assign=True)
    model.eval()

    def run(fused: bool) -> tuple[list[int], list[list[float]], int]:
        engine = Engine(model, max_batch_size=4, score_batch_size=1, max_step_tokens=8)
        stream = engine.open_stream([7, 8, 9])
        assert stream is not None
        rid = engine.add_request(GenerationRequest([3, 4, 5], 6, stop_tokens=frozenset()))
        tokens: list[int] = []
        scores: list[list[float]] = []
        passes = 0
        while engine.has_unfinished():
            check = StreamCheck(stream, [10 + len(tokens)] * 6, [1, 2], [[20], [21, 22]])
            before = engine.stats.forward_passes
            if fused:
                events, got = engine.step_with_checks([check])
            else:
                events, got = engine.step(), engine.check_streams([check])
            passes += engine.stats.forward_passes - before
            tokens.extend(e.token for e in events if e.request_id == rid)
            scores.extend(got)
        return tokens, scores, passes

    apart, fused = run(False), run(True)
    assert fused[0] == apart[0] and len(fused[0]) == 6
    for f, a in zip(fused[1], apart[1], strict=True):
        assert f == pytest.approx(a, abs=TOL)
    assert (fused[2], apart[2]) == (12, 12)  # two passes a tick: nothing fused


def test_streams_take_generation_slots_and_give_them_back(demo_runtime: Any) -> None:
    engine = demo_runtime.engine
    free = engine.free_slots
    streams = [engine.open_stream([1, 2, 3]) for _ in range(free)]
    assert all(s is not None for s in streams) and engine.free_slots == 0
    assert engine.open_stream([1, 2, 3]) is None  # full: the caller waits or checks at the end
    for s in streams:
        assert s is not None
        engine.close_stream(s)
    assert engine.free_slots == free
    with pytest.raises(RequestError):
        engine.check_streams([StreamCheck(12345, [5], [6], [[7]])])


def test_a_generated_turn_marker_or_control_id_cannot_close_the_checker_turn(
    demo_runtime: Any,
) -> None:
    tok = demo_runtime.tokenizer
    closer = tok.inst_close()
    words = tok.encode("fine words", bos=False)
    answer = [*words, *closer, tok.eos_id, tok.bos_id, *words]
    safe = checkable_answer_tokens(tok, answer)
    assert len(safe) == len(answer)  # one token out per token in: positions are kept
    assert safe[: len(words)] == words and safe[-len(words) :] == words
    joined = [*safe, *closer]
    n = len(closer)
    assert [i for i in range(len(joined) - n + 1) if joined[i : i + n] == closer] == [len(safe)]
    assert tok.eos_id not in safe and tok.bos_id not in safe
    if n > 1:
        # A closer split across two checks is broken all the same.
        first = checkable_answer_tokens(tok, [*words, *closer[:1]])
        second = checkable_answer_tokens(tok, closer[1:], first)
        assert [*first, *second][-n:] != closer


def scores_from_scratch(classifier: Classifier, prep: Any, tokens: list[int]) -> list[float]:
    planned = classifier.planner.plan_stream_output(prep)
    closer = classifier.tokenizer.inst_close()
    labels = label_continuations(planned.policy, classifier.tokenizer)
    prompt = [*planned.prefix, *planned.bodies[0], *tokens, *closer]
    return from_scratch(classifier.engine, prompt, labels)


def test_guarded_stream_releases_checked_chunks_with_verdicts_equal_to_from_scratch(
    demo_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = demo_runtime
    classifier: Classifier = rt.classifier
    seen: list[tuple[list[int], Classification]] = []
    check = classifier.check_outputs

    def spy(checks: Any, **kwargs: Any) -> list[Classification]:
        results = check(checks, **kwargs)
        seen.extend((list(s.checked), r) for (s, _), r in zip(checks, results, strict=True))
        return results

    monkeypatch.setattr(classifier, "check_outputs", spy)
    messages = [ChatMessage("user", "Tell me a story")]
    options = GenerateOptions(max_new_tokens=45, moderate_output=True, threshold=1.0,
                              stream_check_tokens=7)  # fmt: skip
    *deltas, result = rt.generator.stream(messages, options)
    assert isinstance(result, GenerationResult) and not result.refused
    assert len(deltas) > 1 and "".join(deltas) == result.text
    assert result.released_tokens == result.completion_tokens
    prep = rt.generator.prepare(messages, options)
    assert [len(t) for t, _ in seen] == [min(7 * k, 45) for k in range(1, len(seen) + 1)]
    for tokens, verdict in seen:
        want = scores_from_scratch(classifier, prep, tokens)
        got = [verdict.scores[c] for c in verdict.scores]
        top = max(want)
        total = sum(2.718281828459045 ** (w - top) for w in want)
        probs = [2.718281828459045 ** (w - top) / total for w in want]
        assert got == pytest.approx(probs, abs=TOL)
    assert result.output_moderation == seen[-1][1]  # the last check speaks for the answer


def test_a_flagging_check_stops_generation_mid_answer(
    demo_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real engine, a threshold between two checks' scores: the checks before it release
    their tokens, the one that reaches it ends the stream."""
    rt = demo_runtime
    messages = [ChatMessage("user", "Write a long poem")]
    every = 4
    options = GenerateOptions(max_new_tokens=60, moderate_output=True, threshold=1.0,
                              stream_check_tokens=every)  # fmt: skip
    verdicts: list[float] = []
    check = rt.classifier.check_outputs

    def spy(checks: Any, **kwargs: Any) -> list[Classification]:
        results = check(checks, **kwargs)
        verdicts.extend(r.unsafe_probability for r in results)
        return results

    monkeypatch.setattr(rt.classifier, "check_outputs", spy)
    *_, full = rt.generator.stream(messages, options)
    assert isinstance(full, GenerationResult) and full.completion_tokens == 60
    # The first check whose score is above all earlier ones flags at a threshold between.
    k = next(i for i in range(1, len(verdicts)) if verdicts[i] > max(verdicts[:i]))
    threshold = (verdicts[k] + max(verdicts[:k])) / 2
    verdicts.clear()
    flagged_options = GenerateOptions(max_new_tokens=60, moderate_output=True,
                                      threshold=threshold, stream_check_tokens=every)  # fmt: skip
    *deltas, result = rt.generator.stream(messages, flagged_options)
    assert isinstance(result, GenerationResult)
    assert result.finish_reason == "output_flagged" and result.text == ""
    assert result.output_moderation is not None and result.output_moderation.flagged
    assert result.released_tokens == every * k
    assert result.completion_tokens == every * (k + 1)  # nothing generated after the flag
    assert len(verdicts) == k + 1
    released = rt.tokenizer.decode(rt.generator.engine.generate(
        [rt.generator.prepare(messages, options).prompt], every * k)[0])  # fmt: skip
    assert "".join(deltas) == released[: len("".join(deltas))]
    assert full.text.startswith("".join(deltas))


def test_concurrent_streams_get_the_same_verdicts_as_one_at_a_time(demo_runtime: Any) -> None:
    rt = demo_runtime
    prompts = ["Tell me a story", "What is the capital of France?", "Write a poem about rain"]

    def prep(text: str, every: int) -> Any:
        return rt.generator.prepare(
            [ChatMessage("user", text)],
            GenerateOptions(max_new_tokens=30, moderate_output=True, threshold=1.0,
                            stream_check_tokens=every),
        )  # fmt: skip

    async def collect(worker: WorkerThread, p: Any) -> list[Any]:
        return [e async for e in worker.generate(p, stream=True)]

    async def scenario() -> tuple[list[list[Any]], list[list[Any]]]:
        worker = WorkerThread(rt)
        worker.start()
        try:
            preps = [prep(t, every) for t, every in zip(prompts, [3, 8, 5], strict=True)]
            together = await asyncio.gather(*(collect(worker, p) for p in preps))
            alone = [await collect(worker, p) for p in preps]
            return list(together), alone
        finally:
            await asyncio.to_thread(worker.stop, 10)

    together, alone = asyncio.run(asyncio.wait_for(scenario(), 120))
    for a, b in zip(together, alone, strict=True):
        ra, rb = a[-1], b[-1]
        assert a[:-1] == b[:-1]  # the same deltas, released at the same checks
        assert ra.text == rb.text and ra.released_tokens == rb.released_tokens
        assert ra.output_moderation.flagged == rb.output_moderation.flagged
        for key, value in rb.output_moderation.scores.items():
            assert ra.output_moderation.scores[key] == pytest.approx(value, abs=TOL)
    assert rt.engine.open_streams == 0


def test_with_one_generation_slot_the_answer_is_checked_once_at_the_end(
    demo_checkpoint: Any,
) -> None:
    from moderation.runtime import load_runtime

    rt = load_runtime(demo_checkpoint, device="cpu", dtype="float32", max_batch_size=1)
    assert rt.engine.max_batch_size == 1
    messages = [ChatMessage("user", "Tell me a story")]
    options = GenerateOptions(max_new_tokens=12, moderate_output=True, threshold=1.0,
                              stream_check_tokens=4)  # fmt: skip
    *deltas, result = rt.generator.stream(messages, options)
    assert isinstance(result, GenerationResult) and not result.refused
    assert deltas == [result.text]  # no slot for checks: the whole answer, once checked
    assert result.output_moderation is not None and rt.engine.open_streams == 0
