"""The built-in policies in other APIs' taxonomies (`openai`, `mistral`, `mlcommons`): their
category names are the APIs' own, each maps to one of the paper's three, and their labels score
as distinct answers with the real Mistral tokenizer."""

from __future__ import annotations

import pytest

from model.tokenizer import Tokenizer, mistral_common_tokenizer_path
from moderation.core.builtin_policies import BUILTIN_POLICIES
from moderation.core.policy import PAPER_CATEGORY_IDS, Category, Policy, PolicyError
from moderation.core.prompts import build_prefix, label_continuations
from moderation.core.vendor_policies import MISTRAL_POLICY, MLCOMMONS_POLICY, OPENAI_POLICY

# The keys of OpenAI's moderation result (`results[].categories`), as its API spells them.
OPENAI_NAMES = {
    "harassment": "hateful_harassing_violent",
    "harassment/threatening": "hateful_harassing_violent",
    "hate": "hateful_harassing_violent",
    "hate/threatening": "hateful_harassing_violent",
    "illicit": "illegal_activities",
    "illicit/violent": "illegal_activities",
    "self-harm": "hateful_harassing_violent",
    "self-harm/intent": "hateful_harassing_violent",
    "self-harm/instructions": "hateful_harassing_violent",
    "sexual": "hateful_harassing_violent",
    "sexual/minors": "illegal_activities",
    "violence": "hateful_harassing_violent",
    "violence/graphic": "hateful_harassing_violent",
}
# Mistral's moderation API (mistral-moderation-2411).
MISTRAL_NAMES = {
    "sexual": "hateful_harassing_violent",
    "hate_and_discrimination": "hateful_harassing_violent",
    "violence_and_threats": "hateful_harassing_violent",
    "dangerous_and_criminal_content": "illegal_activities",
    "selfharm": "hateful_harassing_violent",
    "health": "unqualified_advice",
    "financial": "unqualified_advice",
    "law": "unqualified_advice",
    "pii": "illegal_activities",
}
# Llama Guard 3's hazard codes, in order.
MLCOMMONS_CODES = [f"s{i}" for i in range(1, 15)]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(mistral_common_tokenizer_path("v1"))


def test_the_openai_policy_has_openais_13_category_names_in_its_order() -> None:
    assert BUILTIN_POLICIES["openai"] is OPENAI_POLICY
    assert list(OPENAI_POLICY.category_ids) == list(OPENAI_NAMES)
    assert {c.id: c.paper_category for c in OPENAI_POLICY.categories} == OPENAI_NAMES


def test_the_mistral_policy_has_mistrals_9_category_names() -> None:
    assert BUILTIN_POLICIES["mistral"] is MISTRAL_POLICY
    assert {c.id: c.paper_category for c in MISTRAL_POLICY.categories} == MISTRAL_NAMES
    assert set(MISTRAL_NAMES.values()) == set(PAPER_CATEGORY_IDS)


def test_the_mlcommons_policy_has_llama_guard_3s_s1_to_s14() -> None:
    assert BUILTIN_POLICIES["mlcommons"] is MLCOMMONS_POLICY
    ids = MLCOMMONS_POLICY.category_ids
    assert [i.split("_")[0] for i in ids] == MLCOMMONS_CODES
    # the description opens with the code, as Llama Guard's prompt lists them
    for code, category in zip(MLCOMMONS_CODES, MLCOMMONS_POLICY.categories, strict=True):
        assert category.description.startswith(code.upper() + ": ")
    by_code = {c.id.split("_")[0]: c.paper_category for c in MLCOMMONS_POLICY.categories}
    assert by_code["s6"] == "unqualified_advice" and by_code["s10"] == "hateful_harassing_violent"
    assert by_code["s9"] == "illegal_activities"
    assert set(by_code.values()) == set(PAPER_CATEGORY_IDS)


@pytest.mark.parametrize("policy", [OPENAI_POLICY, MISTRAL_POLICY, MLCOMMONS_POLICY])
def test_labels_score_as_distinct_answers(policy: Policy, tokenizer: Tokenizer) -> None:
    continuations = label_continuations(policy, tokenizer)
    assert len(set(continuations)) == len(policy.labels)
    # No label is scored as the beginning of another: a label that begins a longer one ends
    # with the end of the answer, so the events are disjoint.
    for a in continuations:
        assert not any(b != a and b[: len(a)] == a for b in continuations)
    # Labels are the categories' names in plain words, lowercase, a few tokens each.
    for category in policy.categories:
        assert category.label == category.label.lower() and len(category.label.split()) <= 3
    # The prompt is Mistral's self-reflection layout, listing every label with its description.
    instruction = policy.instruction
    assert instruction.startswith("You're given a list of moderation categories")
    for category in policy.categories:
        assert f"- {category.label}: {category.description}" in instruction
    assert build_prefix(policy, "input", tokenizer)[0] == tokenizer.bos_id


def test_ids_may_join_words_with_slash_or_hyphen_but_nothing_else() -> None:
    def policy(category_id: str) -> Policy:
        return Policy("p", "", (Category(category_id, "x", "y", "illegal_activities"),))

    assert policy("self-harm/intent").category_ids == ("self-harm/intent",)
    for bad in ("self-harm/", "/x", "a//b", "a-/b", "-a", "a b", "A/b", "a.b"):
        with pytest.raises(PolicyError, match="id must be lowercase"):
            policy(bad)
