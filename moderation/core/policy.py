"""Moderation policies: named taxonomies of harm categories and the prompt that asks for them.

A policy lists categories (an id for the API, the label word the model answers, a description
shown in the prompt) and the instruction text that precedes the classified text. The model
answers with one label, or with the acceptable label ("not moderated") when the text is safe.
Every category maps to one of the three categories of the Mistral 7B paper (section 5.2), so
answers of any policy can also be reported in the paper's terms.

The built-in policies are in `moderation.core.builtin_policies`. Custom policies load from
JSON or TOML files.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from moderation.core.text_safety import CHAT_MARKER_RE, CONTROL_CHAR_RE


class PolicyError(ValueError):
    """A policy is invalid, or a policy name or file cannot be resolved."""


class Role(StrEnum):
    """What is being classified: a user prompt (input) or an assistant answer (output).

    A `str` enum (StrEnum is `str` + `Enum`): `Role.INPUT == "input"`, `Role("output")` works.
    """

    INPUT = "input"
    OUTPUT = "output"


# Paper section 5.1, verbatim (also what Mistral's API prepends with `safe_prompt=True`).
GUARDRAIL_SYSTEM_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
    "and positivity."
)

DEFAULT_ACCEPTABLE_LABEL = "not moderated"
# Reserved: the classifier reports the acceptable outcome under this id, so no category may use it.
ACCEPTABLE_ID = "acceptable"

# Ids are API keys: lowercase words joined by "_", or by "-" and "/" as OpenAI's category names
# are ("self-harm/intent"), so that a policy can answer under another API's names.
_ID_RE = re.compile(r"[a-z][a-z0-9_]*(?:[-/][a-z0-9_]+)*")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Category:
    """One harm category: API id, the label the model answers, its prompt description."""

    id: str
    label: str
    description: str
    paper_category: str


# The paper's three categories (section 5.2). Labels are single words the model answers with:
# "illegal" and "hateful" are the first word of the paper's wording; "unqualified" mirrors the
# "unqualified law/financial/health" labels of Mistral's 13-category prompt.
PAPER_CATEGORIES: tuple[Category, ...] = (
    Category(
        id="illegal_activities",
        label="illegal",
        description="Illegal activities such as terrorism, child abuse or fraud",
        paper_category="illegal_activities",
    ),
    Category(
        id="hateful_harassing_violent",
        label="hateful",
        description=(
            "Hateful, harassing or violent content such as discrimination, self-harm or bullying"
        ),
        paper_category="hateful_harassing_violent",
    ),
    Category(
        id="unqualified_advice",
        label="unqualified",
        description="Unqualified advice for instance in legal, medical or financial domains",
        paper_category="unqualified_advice",
    ),
)
PAPER_CATEGORY_IDS: tuple[str, ...] = tuple(c.id for c in PAPER_CATEGORIES)

# The instruction layout of Mistral's self-reflection prompt; `default_instruction` fills it.
_INSTRUCTION_HEAD = "You're given a list of moderation categories as below:"
_INSTRUCTION_TAIL = (
    "Please classify the following text into one of these categories, and answer with that "
    "single word only.\n\n"
    "If the sentence does not fall within these categories, is safe and does not need to be "
    'moderated, please answer "{acceptable}".'
)


def default_instruction(categories: tuple[Category, ...], acceptable_label: str) -> str:
    """The instruction in the style of Mistral's self-reflection prompt, for these categories."""
    lines = []
    for category in categories:
        description = category.description.strip()
        # Mistral's descriptions all end with a period; keep the list uniform.
        if not description.endswith((".", "!", "?")):
            description += "."
        lines.append(f"- {category.label}: {description}")
    tail = _INSTRUCTION_TAIL.format(acceptable=acceptable_label)
    return f"{_INSTRUCTION_HEAD}\n\n" + "\n".join(lines) + f"\n\n{tail}"


@dataclass(frozen=True)
class Policy:
    """A named taxonomy plus its instruction prompt. Validated on construction.

    An empty `instruction` is replaced by `default_instruction(categories, acceptable_label)`.
    """

    name: str
    description: str
    categories: tuple[Category, ...]
    acceptable_label: str = DEFAULT_ACCEPTABLE_LABEL
    instruction: str = ""

    def __post_init__(self) -> None:
        # Accept any sequence (e.g. a list from a caller) but store a hashable tuple.
        if not isinstance(self.categories, tuple):
            object.__setattr__(self, "categories", tuple(self.categories))
        generate = all(isinstance(c, Category) for c in self.categories)
        if not self.instruction and generate and isinstance(self.acceptable_label, str):
            generated = default_instruction(self.categories, self.acceptable_label)
            object.__setattr__(self, "instruction", generated)
        _validate(self)

    @property
    def labels(self) -> tuple[str, ...]:
        """Answer labels in scoring order: every category label, then the acceptable label."""
        return (*(c.label for c in self.categories), self.acceptable_label)

    @property
    def category_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.categories)

    def category(self, category_id: str) -> Category:
        """The category with this id; PolicyError if the policy has none."""
        for category in self.categories:
            if category.id == category_id:
                return category
        raise PolicyError(f"policy {self.name!r} has no category {category_id!r}")


def _check_text(where: str, value: str, *, single_line: bool) -> None:
    """Trusted prompt text must not contain template markers or control characters."""
    if CHAT_MARKER_RE.search(value):
        raise PolicyError(f"{where} contains a chat-template marker ([INST] or [/INST])")
    if CONTROL_CHAR_RE.search(value) or (single_line and ("\n" in value or "\t" in value)):
        allowed = "" if single_line else " (only newline and tab are allowed)"
        raise PolicyError(f"{where} contains a control character{allowed}")


def _validate(policy: Policy) -> None:
    """All policy checks in one place; raises PolicyError naming the problem."""
    if not isinstance(policy.name, str) or not _NAME_RE.fullmatch(policy.name):
        raise PolicyError(
            f"policy name {policy.name!r} must be non-empty letters, digits, '_', '-' or '.'"
        )
    where = f"policy {policy.name!r}"
    for field in ("description", "acceptable_label", "instruction"):
        if not isinstance(getattr(policy, field), str):
            raise PolicyError(f"{where}: {field} must be a string")
    if not policy.categories:
        raise PolicyError(f"{where}: needs at least one category")
    for i, category in enumerate(policy.categories):
        if not isinstance(category, Category):
            raise PolicyError(f"{where}: category {i} is not a Category")
        for field in ("id", "label", "description", "paper_category"):
            if not isinstance(getattr(category, field), str):
                raise PolicyError(f"{where}: category {i}: {field} must be a string")
    acceptable = policy.acceptable_label
    if not acceptable.strip() or acceptable != acceptable.strip():
        raise PolicyError(f"{where}: acceptable_label must be non-empty without outer spaces")
    _check_text(f"{where}: acceptable_label", acceptable, single_line=True)
    _check_text(f"{where}: instruction", policy.instruction, single_line=False)
    if not policy.instruction.strip():
        raise PolicyError(f"{where}: instruction is empty")

    seen_ids: set[str] = set()
    seen_labels = {acceptable.casefold(): "the acceptable label"}
    for i, category in enumerate(policy.categories):
        cat = f"{where}: category {category.id!r}" if category.id else f"{where}: category {i}"
        if not _ID_RE.fullmatch(category.id):
            raise PolicyError(
                f"{cat}: id must be lowercase letters, digits and '_', starting with a letter "
                "(single '-' or '/' may join words)"
            )
        if category.id == ACCEPTABLE_ID:
            raise PolicyError(f"{cat}: id {ACCEPTABLE_ID!r} is reserved for the acceptable outcome")
        if category.id in seen_ids:
            raise PolicyError(f"{where}: duplicate category id {category.id!r}")
        seen_ids.add(category.id)
        label = category.label
        if not label.strip() or label != label.strip():
            raise PolicyError(f"{cat}: label must be non-empty without outer spaces")
        _check_text(f"{cat}: label", label, single_line=True)
        # Labels are compared case-insensitively: "Fraud" and "fraud" would be one answer to a
        # reader, and the acceptable label must never double as a category.
        if label.casefold() in seen_labels:
            other = seen_labels[label.casefold()]
            raise PolicyError(f"{cat}: label {label!r} duplicates {other}")
        seen_labels[label.casefold()] = f"the label of category {category.id!r}"
        if not category.description.strip():
            raise PolicyError(f"{cat}: description is empty")
        # One line each: the instruction lists categories one per line.
        _check_text(f"{cat}: description", category.description, single_line=True)
        if category.paper_category not in PAPER_CATEGORY_IDS:
            raise PolicyError(
                f"{cat}: unknown paper_category {category.paper_category!r} "
                f"(one of {', '.join(PAPER_CATEGORY_IDS)})"
            )


_FILE_FIELDS = {"name", "description", "acceptable_label", "instruction", "categories"}
_CATEGORY_FIELDS = ("id", "label", "description", "paper_category")


def _field(data: Mapping[str, Any], key: str, where: str, *, required: bool) -> str | None:
    """A string field of a parsed policy file, with a PolicyError naming what is wrong."""
    if key not in data:
        if required:
            raise PolicyError(f"{where}: missing field {key!r}")
        return None
    value = data[key]
    if not isinstance(value, str):
        raise PolicyError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def policy_from_dict(data: Any, *, source: str = "policy") -> Policy:
    """Build a Policy from parsed JSON/TOML data (the file schema); PolicyError if invalid."""
    if not isinstance(data, Mapping):
        raise PolicyError(f"{source}: expected an object/table at top level")
    unknown = sorted(set(data) - _FILE_FIELDS)
    if unknown:
        raise PolicyError(f"{source}: unknown field(s) {', '.join(map(repr, unknown))}")
    name = _field(data, "name", source, required=True)
    assert name is not None  # required=True
    description = _field(data, "description", source, required=False) or ""
    acceptable = _field(data, "acceptable_label", source, required=False)
    instruction = _field(data, "instruction", source, required=False) or ""
    if "categories" not in data:
        raise PolicyError(f"{source}: missing field 'categories'")
    raw_categories = data["categories"]
    if not isinstance(raw_categories, list) or not raw_categories:
        raise PolicyError(f"{source}: 'categories' must be a non-empty list of objects/tables")
    categories = []
    for i, raw in enumerate(raw_categories):
        where = f"{source}: categories[{i}]"
        if not isinstance(raw, Mapping):
            raise PolicyError(f"{where}: expected an object/table, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_CATEGORY_FIELDS))
        if unknown:
            raise PolicyError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}")
        values = [_field(raw, key, where, required=True) for key in _CATEGORY_FIELDS]
        categories.append(Category(*(v or "" for v in values)))
    try:
        return Policy(
            name=name,
            description=description,
            categories=tuple(categories),
            acceptable_label=DEFAULT_ACCEPTABLE_LABEL if acceptable is None else acceptable,
            instruction=instruction,
        )
    except PolicyError as exc:
        raise PolicyError(f"{source}: {exc}") from exc


def load_policy_file(path: str | Path) -> Policy:
    """Load a custom policy from a .json or .toml file (format chosen by extension).

    Schema: name, description (optional), acceptable_label (optional, default "not moderated"),
    instruction (optional, default generated in the style of Mistral's prompt), categories: a
    list of {id, label, description, paper_category}. Any problem raises PolicyError naming the
    file and the problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise PolicyError(f"{path}: policy files must end in .json or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{path}: policy file not found") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file ({exc.strerror})") from exc
    data: Any
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError(
                f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from exc
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            # The message carries "(at line L, column C)".
            raise PolicyError(f"{path}: invalid TOML: {exc}") from exc
    return policy_from_dict(data, source=str(path))


def is_policy_file(name_or_path: str) -> bool:
    """Whether a policy option names a file (a .json/.toml path, or an existing file)."""
    path = Path(name_or_path)
    return path.suffix.lower() in (".json", ".toml") or path.is_file()
