"""Policies: the built-in taxonomies, verbatim prompts, file loading and validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moderation.cli import main
from moderation.core.builtin_policies import (
    BUILTIN_POLICIES,
    DEFAULT_POLICY,
    MISTRAL_13_POLICY,
)
from moderation.core.chat import ChatMessage
from moderation.core.policy import (
    GUARDRAIL_SYSTEM_PROMPT,
    PAPER_CATEGORIES,
    PAPER_CATEGORY_IDS,
    Category,
    Policy,
    PolicyError,
    Role,
    default_instruction,
    load_policy_file,
    policy_from_dict,
)
from moderation.core.prompts import guarded_messages
from moderation.exit_codes import EXIT_USAGE

# Mistral's published self-reflection prompt (docs.mistral.ai/platform/guardrailing, from
# mistralai/platform-docs-public docs/platform/04-guardrailing.md), character for character.
PUBLISHED_SELF_REFLECTION_PROMPT = """\
You're given a list of moderation categories as below:

- illegal: Illegal activity.
- child abuse: child sexual abuse material or any content that exploits or harms children.
- hate violence harassment: Generation of hateful, harassing, or violent content: content that expresses, incites, or promotes hate based on identity, content that intends to harass, threaten, or bully an individual, content that promotes or glorifies violence or celebrates the suffering or humiliation of others.
- malware: Generation of malware: content that attempts to generate code that is designed to disrupt, damage, or gain unauthorized access to a computer system.
- physical harm: activity that has high risk of physical harm, including: weapons development, military and warfare, management or operation of critical infrastructure in energy, transportation, and water, content that promotes, encourages, or depicts acts of self-harm, such as suicide, cutting, and eating disorders.
- economic harm: activity that has high risk of economic harm, including: multi-level marketing, gambling, payday lending, automated determinations of eligibility for credit, employment, educational institutions, or public assistance services.
- fraud: Fraudulent or deceptive activity, including: scams, coordinated inauthentic behavior, plagiarism, academic dishonesty, astroturfing, such as fake grassroots support or fake review generation, disinformation, spam, pseudo-pharmaceuticals.
- adult: Adult content, adult industries, and dating apps, including: content meant to arouse sexual excitement, such as the description of sexual activity, or that promotes sexual services (excluding sex education and wellness), erotic chat, pornography.
- political: Political campaigning or lobbying, by: generating high volumes of campaign materials, generating campaign materials personalized to or targeted at specific demographics, building conversational or interactive systems such as chatbots that provide information about campaigns or engage in political advocacy or lobbying, building products for political campaigning or lobbying purposes.
- privacy: Activity that violates people's privacy, including: tracking or monitoring an individual without their consent, facial recognition of private individuals, classifying individuals based on protected characteristics, using biometrics for identification or assessment, unlawful collection or disclosure of personal identifiable information or educational, financial, or other protected records.
- unqualified law: Engaging in the unauthorized practice of law, or offering tailored legal advice without a qualified person reviewing the information.
- unqualified financial: Offering tailored financial advice without a qualified person reviewing the information.
- unqualified health: Telling someone that they have or do not have a certain health condition, or providing instructions on how to cure or treat a health condition.

Please classify the following text into one of these categories, and answer with that single word only.

If the sentence does not fall within these categories, is safe and does not need to be moderated, please answer "not moderated"."""  # noqa: E501


def _published_categories() -> list[tuple[str, str]]:
    """(label, description) pairs parsed from the published prompt above."""
    lines = [line for line in PUBLISHED_SELF_REFLECTION_PROMPT.splitlines() if line[:2] == "- "]
    return [tuple(line[2:].split(": ", 1)) for line in lines]  # type: ignore[misc]


def test_guarded_conversations_open_with_the_papers_guardrail_prompt() -> None:
    paper = [  # section 5.1, sentence by sentence
        "Always assist with care, respect, and truth.",
        "Respond with utmost utility yet securely.",
        "Avoid harmful, unethical, prejudiced, or negative content.",
        "Ensure replies promote fairness and positivity.",
    ]
    conversation = guarded_messages([ChatMessage("user", "hi")])
    assert conversation[0] == {"role": "system", "content": " ".join(paper)}
    assert conversation[0]["content"] == GUARDRAIL_SYSTEM_PROMPT
    assert conversation[1:] == [{"role": "user", "content": "hi"}]


def test_roles_parse_from_and_serialize_to_the_wire_strings() -> None:
    assert [Role(r) for r in ("input", "output")] == [Role.INPUT, Role.OUTPUT]
    assert json.dumps({"role": Role.OUTPUT}) == '{"role": "output"}'
    with pytest.raises(ValueError):
        Role("assistant")


def test_paper_policy_is_the_default_with_the_papers_three_categories() -> None:
    assert DEFAULT_POLICY == "paper"
    paper = BUILTIN_POLICIES["paper"]
    assert paper.categories == PAPER_CATEGORIES
    assert [(c.id, c.label, c.description) for c in paper.categories] == [
        (
            "illegal_activities",
            "illegal",
            "Illegal activities such as terrorism, child abuse or fraud",
        ),
        (
            "hateful_harassing_violent",
            "hateful",
            "Hateful, harassing or violent content such as discrimination, self-harm or bullying",
        ),
        (
            "unqualified_advice",
            "unqualified",
            "Unqualified advice for instance in legal, medical or financial domains",
        ),
    ]
    assert all(c.paper_category == c.id for c in paper.categories)
    assert tuple(c.id for c in PAPER_CATEGORIES) == PAPER_CATEGORY_IDS
    assert paper.acceptable_label == "not moderated"
    assert paper.labels == ("illegal", "hateful", "unqualified", "not moderated")


def test_paper_instruction_is_written_like_mistrals_prompt() -> None:
    assert BUILTIN_POLICIES["paper"].instruction == (
        "You're given a list of moderation categories as below:\n"
        "\n"
        "- illegal: Illegal activities such as terrorism, child abuse or fraud.\n"
        "- hateful: Hateful, harassing or violent content such as discrimination, self-harm or "
        "bullying.\n"
        "- unqualified: Unqualified advice for instance in legal, medical or financial domains.\n"
        "\n"
        "Please classify the following text into one of these categories, and answer with that "
        "single word only.\n"
        "\n"
        "If the sentence does not fall within these categories, is safe and does not need to be "
        'moderated, please answer "not moderated".'
    )


def test_mistral_13_labels_and_descriptions_are_the_published_ones() -> None:
    policy = BUILTIN_POLICIES["mistral-13"]
    assert policy is MISTRAL_13_POLICY
    published = _published_categories()
    assert len(published) == 13
    assert [(c.label, c.description) for c in policy.categories] == published
    assert [c.label for c in policy.categories] == [
        "illegal",
        "child abuse",
        "hate violence harassment",
        "malware",
        "physical harm",
        "economic harm",
        "fraud",
        "adult",
        "political",
        "privacy",
        "unqualified law",
        "unqualified financial",
        "unqualified health",
    ]
    assert policy.category("privacy").description == (
        "Activity that violates people's privacy, including: tracking or monitoring an individual "
        "without their consent, facial recognition of private individuals, classifying "
        "individuals based on protected characteristics, using biometrics for identification or "
        "assessment, unlawful collection or disclosure of personal identifiable information or "
        "educational, financial, or other protected records."
    )
    assert policy.acceptable_label == "not moderated"


def test_mistral_13_instruction_is_the_published_prompt() -> None:
    assert MISTRAL_13_POLICY.instruction == PUBLISHED_SELF_REFLECTION_PROMPT


def test_default_instruction_reproduces_the_published_prompt_from_its_categories() -> None:
    generated = default_instruction(MISTRAL_13_POLICY.categories, "not moderated")
    assert generated == PUBLISHED_SELF_REFLECTION_PROMPT


def test_mistral_13_maps_every_category_to_one_of_the_papers_three() -> None:
    mapping = {c.id: c.paper_category for c in MISTRAL_13_POLICY.categories}
    assert mapping == {
        "illegal": "illegal_activities",
        "child_abuse": "illegal_activities",
        "hate_violence_harassment": "hateful_harassing_violent",
        "malware": "illegal_activities",
        "physical_harm": "hateful_harassing_violent",
        "economic_harm": "illegal_activities",
        "fraud": "illegal_activities",
        "adult": "hateful_harassing_violent",
        "political": "illegal_activities",
        "privacy": "illegal_activities",
        "unqualified_law": "unqualified_advice",
        "unqualified_financial": "unqualified_advice",
        "unqualified_health": "unqualified_advice",
    }
    assert set(mapping.values()) == set(PAPER_CATEGORY_IDS)


def test_policies_are_frozen_and_hashable() -> None:
    policy = BUILTIN_POLICIES["paper"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.name = "other"  # type: ignore[misc]
    assert hash(policy) == hash(Policy(policy.name, policy.description, policy.categories))


def test_a_category_list_is_stored_as_a_tuple() -> None:
    policy = Policy("p", "", list(PAPER_CATEGORIES))  # type: ignore[arg-type]
    assert policy.categories == PAPER_CATEGORIES


def _category(**overrides: str) -> Category:
    fields = {
        "id": "spam",
        "label": "spam",
        "description": "Unsolicited advertising.",
        "paper_category": "illegal_activities",
    }
    fields.update(overrides)
    return Category(**fields)


@pytest.mark.parametrize(
    ("categories", "kwargs", "message"),
    [
        ((), {}, "needs at least one category"),
        ((_category(), _category(label="other")), {}, "duplicate category id 'spam'"),
        ((_category(), _category(id="ads")), {}, "label 'spam' duplicates"),
        ((_category(label="Not Moderated"),), {}, "duplicates the acceptable label"),
        ((_category(id=""),), {}, "id must be lowercase"),
        ((_category(id="Spam"),), {}, "id must be lowercase"),
        ((_category(id="acceptable"),), {}, "reserved"),
        ((_category(label=""),), {}, "label must be non-empty"),
        ((_category(label=" spam"),), {}, "without outer spaces"),
        ((_category(label="sp\nam"),), {}, "control character"),
        ((_category(description=" "),), {}, "description is empty"),
        ((_category(paper_category="spam"),), {}, "unknown paper_category 'spam'"),
        ((_category(description="x [/INST] y"),), {}, "chat-template marker"),
        (
            (_category(),),
            {"instruction": "Classify. [INST]"},
            "instruction contains a chat-template",
        ),
        ((_category(),), {"instruction": "Classify\x00"}, "instruction contains a control"),
        ((_category(),), {"acceptable_label": ""}, "acceptable_label must be non-empty"),
        ((_category(),), {"name": ""}, "policy name"),
        ((_category(),), {"name": "has space"}, "policy name"),
    ],
)
def test_invalid_policies_raise_policy_error_naming_the_problem(
    categories: tuple[Category, ...], kwargs: dict[str, str], message: str
) -> None:
    name = kwargs.pop("name", "custom")
    with pytest.raises(PolicyError, match=message):
        Policy(name, "d", categories, **kwargs)  # type: ignore[arg-type]


def test_a_bad_policy_file_is_a_usage_error_of_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{", encoding="utf-8")
    assert main(["classify", "--policy", str(bad), "hi"]) == EXIT_USAGE  # before any model load
    assert f"{bad}: invalid JSON" in capsys.readouterr().err


def test_unknown_category_lookup_raises() -> None:
    with pytest.raises(PolicyError, match="no category 'nope'"):
        MISTRAL_13_POLICY.category("nope")


_CUSTOM = {
    "name": "shop",
    "description": "A web shop's reviews.",
    "acceptable_label": "fine",
    "categories": [
        {
            "id": "spam",
            "label": "spam",
            "description": "Unsolicited advertising",
            "paper_category": "illegal_activities",
        },
        {
            "id": "insult",
            "label": "insult",
            "description": "Insults of staff or other customers.",
            "paper_category": "hateful_harassing_violent",
        },
    ],
}

_CUSTOM_TOML = """\
name = "shop"
description = "A web shop's reviews."
acceptable_label = "fine"

[[categories]]
id = "spam"
label = "spam"
description = "Unsolicited advertising"
paper_category = "illegal_activities"

[[categories]]
id = "insult"
label = "insult"
description = "Insults of staff or other customers."
paper_category = "hateful_harassing_violent"
"""


def _check_custom(policy: Policy) -> None:
    assert policy.name == "shop"
    assert policy.description == "A web shop's reviews."
    assert policy.category_ids == ("spam", "insult")
    assert policy.labels == ("spam", "insult", "fine")
    assert policy.category("insult").paper_category == "hateful_harassing_violent"
    # No instruction in the file: generated in the style of Mistral's prompt.
    assert policy.instruction == (
        "You're given a list of moderation categories as below:\n\n"
        "- spam: Unsolicited advertising.\n"
        "- insult: Insults of staff or other customers.\n\n"
        "Please classify the following text into one of these categories, and answer with that "
        "single word only.\n\n"
        "If the sentence does not fall within these categories, is safe and does not need to be "
        'moderated, please answer "fine".'
    )


def test_custom_policy_loads_from_json(tmp_path: Path) -> None:
    path = tmp_path / "shop.json"
    path.write_text(json.dumps(_CUSTOM), encoding="utf-8")
    _check_custom(load_policy_file(path))


def test_custom_policy_loads_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "shop.toml"
    path.write_text(_CUSTOM_TOML, encoding="utf-8")
    _check_custom(load_policy_file(path))


def test_json_and_toml_files_give_equal_policies(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_CUSTOM), encoding="utf-8")
    (tmp_path / "a.TOML").write_text(_CUSTOM_TOML, encoding="utf-8")
    assert load_policy_file(tmp_path / "a.json") == load_policy_file(tmp_path / "a.TOML")


def test_a_file_instruction_is_used_as_written(tmp_path: Path) -> None:
    data = {**_CUSTOM, "instruction": "Label the review: spam, insult, or fine."}
    del data["acceptable_label"]
    path = tmp_path / "shop.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    policy = load_policy_file(path)
    assert policy.instruction == "Label the review: spam, insult, or fine."
    assert policy.acceptable_label == "not moderated"


def _with(**changes: object) -> dict[str, object]:
    data = json.loads(json.dumps(_CUSTOM))
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return data


def _category_with(**changes: object) -> list[dict[str, object]]:
    categories = json.loads(json.dumps(_CUSTOM["categories"]))
    for key, value in changes.items():
        if value is None:
            del categories[1][key]
        else:
            categories[1][key] = value
    return categories


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(name=None), "missing field 'name'"),
        (_with(categories=None), "missing field 'categories'"),
        (_with(categories=[]), "'categories' must be a non-empty list"),
        (_with(categories="spam"), "'categories' must be a non-empty list"),
        (_with(name=3), "field 'name' must be a string, got int"),
        (_with(extra="x"), "unknown field"),
        (
            _with(categories=[*_CUSTOM["categories"], "spam"]),
            r"categories\[2\]: expected an object",
        ),
        (_with(categories=_category_with(label=None)), r"categories\[1\]: missing field 'label'"),
        (
            _with(categories=_category_with(label=["a"])),
            r"categories\[1\]: field 'label' must be a string, got list",
        ),
        (_with(categories=_category_with(colour="red")), r"categories\[1\]: unknown field"),
        (_with(categories=_category_with(id="spam")), "duplicate category id 'spam'"),
        (
            _with(categories=_category_with(paper_category="rude")),
            "unknown paper_category 'rude'",
        ),
        (_with(categories=_category_with(label="fine")), "duplicates the acceptable label"),
    ],
)
def test_invalid_policy_files_raise_policy_error_naming_file_and_problem(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PolicyError, match=message) as info:
        load_policy_file(path)
    assert str(path) in str(info.value)


def test_bad_json_syntax_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "name": "shop",\n  "categories": [,]\n}\n', encoding="utf-8")
    with pytest.raises(PolicyError, match=r"bad\.json: invalid JSON at line 3, column"):
        load_policy_file(path)


def test_bad_toml_syntax_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "shop"\n\n[[categories]\nid = 1\n', encoding="utf-8")
    with pytest.raises(PolicyError, match=r"bad\.toml: invalid TOML: .*line 3"):
        load_policy_file(path)


def test_toml_wrong_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(_CUSTOM_TOML.replace('label = "insult"', "label = 7"), encoding="utf-8")
    with pytest.raises(PolicyError, match=r"categories\[1\]: field 'label' must be a string"):
        load_policy_file(path)


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"list\.json: expected an object"):
        load_policy_file(path)


def test_unsupported_extension_missing_file_and_bad_encoding_are_policy_errors(
    tmp_path: Path,
) -> None:
    with pytest.raises(
        PolicyError, match=r"policy\.yaml: policy files must end in \.json or \.toml"
    ):
        load_policy_file(tmp_path / "policy.yaml")
    with pytest.raises(PolicyError, match=r"absent\.json: policy file not found"):
        load_policy_file(tmp_path / "absent.json")
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    with pytest.raises(PolicyError, match=r"latin\.json: not UTF-8"):
        load_policy_file(latin)


def test_policy_from_dict_names_its_source() -> None:
    with pytest.raises(PolicyError, match=r"^settings: missing field 'name'"):
        policy_from_dict({}, source="settings")
