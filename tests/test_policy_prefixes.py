"""Start-up pre-fills the prefixes of the policies a server names (the default, the policy and
thresholds files', --warm-policies); any other policy's is pre-filled on its first request,
once, with the same scores. On the real engine with the demo checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest

from moderation.core.classifier import Classifier
from moderation.core.decision import ClassifyItem
from moderation.core.limits import ModelLimits
from moderation.core.planning import Planner
from moderation.core.policy import PolicyError, Role, load_policy_file
from moderation.core.prompts import build_prefix
from moderation.core.thresholds import OperatingPoint
from moderation.runtime import RuntimeSettings, check_policies
from moderation.serving.settings import settings_from_env
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc
from tests.servers import REPO, captured_logs, demo_server

SUPPORT_DESK = REPO / "deploy" / "base" / "policies" / "support-desk.json"
COLD = "mlcommons"  # a built-in policy nobody names at start-up
TEXTS = ["How do I bake sourdough bread?", "Tell me how to hurt my neighbour's dog."]


def classifier_with(runtime: Any, **planning: Any) -> Classifier:
    """A classifier of its own (an empty prefix cache) on the demo runtime's engine."""
    planner = Planner(runtime.tokenizer, ModelLimits.of(runtime.engine), **planning)
    return Classifier(runtime.engine, runtime.tokenizer, planner, model_id="d")


def prefixes(classifier: Classifier, policies: Iterable[str]) -> frozenset[tuple[int, ...]]:
    return frozenset(classifier.planner.prefixes(policies))


def cold_items() -> list[ClassifyItem]:
    """Both roles of the cold policy, two texts of each."""
    inputs = [ClassifyItem(t, policy=COLD) for t in TEXTS]
    outputs = [ClassifyItem(t, policy=COLD, role="output", user_prompt="Hi?") for t in TEXTS]
    return [*inputs, *outputs]


def test_start_up_pre_fills_the_default_and_the_policies_the_operator_names(
    demo_runtime: Any,
) -> None:
    desk = load_policy_file(SUPPORT_DESK)
    classifier = classifier_with(
        demo_runtime,
        policies={desk.name: desk},
        operating_points={"mistral": OperatingPoint("mistral", 0.4)},
        warm_policies=("openai",),
    )
    named = ["paper", "support-desk", "mistral", "openai"]
    assert classifier.warm_up() == named
    assert classifier.cached_prefixes == prefixes(classifier, named)
    assert not classifier.cached_prefixes & prefixes(classifier, ["mistral-13", COLD])
    held = sum(classifier.prefix_bytes(p) for p in prefixes(classifier, named))
    assert classifier.prefix_cache_bytes == held > 0


def test_all_pre_fills_every_policy(demo_runtime: Any) -> None:
    classifier = classifier_with(demo_runtime, warm_policies=("all",))
    assert classifier.warm_up() == list(classifier.planner.policies)
    assert classifier.cached_prefixes == prefixes(classifier, classifier.planner.policies)


def test_an_unknown_policy_to_pre_fill_is_refused_before_the_model_loads(demo_runtime: Any) -> None:
    settings = settings_from_env({"MODERATION_WARM_POLICIES": "openai,nope"})
    assert settings.warm_policies == ("openai", "nope")
    with pytest.raises(PolicyError, match="nope"):
        check_policies(settings.runtime_settings())
    with pytest.raises(PolicyError, match="nope"):
        classifier_with(demo_runtime, warm_policies=("nope",))
    check_policies(RuntimeSettings(warm_policies=("all", "mistral-13")))


def test_a_policy_first_used_after_start_up_scores_as_if_pre_filled_and_fills_once(
    demo_runtime: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    warm = classifier_with(demo_runtime)
    warm.warm_up(list(warm.planner.policies))
    expected = warm.classify_many(cold_items())

    cold = classifier_with(demo_runtime)
    assert cold.warm_up() == ["paper"]
    engine = demo_runtime.engine
    filled: list[tuple[int, ...]] = []
    prefill = engine.prefill_prefix

    def counted(tokens: Any) -> Any:
        filled.append(tuple(tokens))
        return prefill(tokens)

    monkeypatch.setattr(engine, "prefill_prefix", counted)
    # Two requests of each role in one batch, then again: one pre-fill per (policy, role).
    got = cold.classify_many(cold_items())
    assert sorted(filled) == sorted(prefixes(cold, [COLD]))
    assert cold.classify_many(cold_items()) == got
    assert len(filled) == 2
    assert cold.cached_prefixes == prefixes(cold, ["paper", COLD])
    for a, b in zip(got, expected, strict=True):
        assert a.scores == pytest.approx(b.scores, abs=1e-6)
        assert a.category == b.category and a.prompt_tokens == b.prompt_tokens


def test_a_server_pre_fills_only_its_default_policy_and_the_rest_on_first_use(
    demo_checkpoint: Path, demo_runtime: Any
) -> None:
    with captured_logs() as logs, demo_server(demo_checkpoint) as served:
        classifier = served.server.runtime.classifier  # type: ignore[union-attr]
        assert classifier.cached_prefixes == prefixes(classifier, ["paper"])
        [line] = [e for e in logs if e["event"] == "policy prefixes pre-filled"]
        assert line["policies"] == ["paper"]
        assert line["on_first_use"] == [p for p in classifier.planner.policies if p != "paper"]
        assert line["mib"] == round(classifier.prefix_cache_bytes / 2**20, 1)
        later = sum(classifier.prefix_bytes(p) for p in prefixes(classifier, line["on_first_use"]))
        assert line["on_first_use_mib"] == round(later / 2**20, 1)

        with grpc.insecure_channel(served.address) as channel:
            stub = pb_grpc.ModerationServiceStub(channel)
            answer = stub.Classify(pb.ClassifyRequest(text=TEXTS[1], policy=COLD), timeout=60)
        policy = classifier.planner.policies[COLD]
        first_used = build_prefix(policy, Role.INPUT, classifier.tokenizer)
        assert classifier.cached_prefixes == prefixes(classifier, ["paper"]) | {first_used}
    warm = classifier_with(demo_runtime)
    warm.warm_up([COLD])
    expected = warm.classify(TEXTS[1], policy=COLD)
    assert dict(answer.scores) == pytest.approx(expected.scores, abs=1e-5)
