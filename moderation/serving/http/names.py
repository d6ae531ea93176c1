"""The model names the OpenAI-compatible routes answer to, and which policy a name selects.

- The served names (`--served-model-name NAME[,ALIAS...]`, vLLM's flag): the first is the `model`
  every compatible response carries and the id `GET /v1/models` lists first; any of them selects
  the generating model on `/v1/chat/completions` and the route's own policy on the moderation
  routes. Without the flag, one name: the loaded model's, as a clean id (the demo checkpoint's
  `demo-tiny-random-mistral`, not its description).
- OpenAI's and Mistral's moderation model names, accepted on the moderation routes only:
  `omni-moderation-latest`, dated `omni-moderation-*`, `text-moderation-latest`,
  `text-moderation-stable` (and numbered `text-moderation-*`) select the `openai` policy;
  `mistral-moderation-latest` and dated `mistral-moderation-*` the `mistral` policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPENAI_POLICY = "openai"
MISTRAL_POLICY = "mistral"

# The names callers send today (the SDKs' defaults and documented aliases).
OPENAI_MODERATION_MODELS = ("omni-moderation-latest", "text-moderation-latest",
                            "text-moderation-stable")  # fmt: skip
MISTRAL_MODERATION_MODELS = ("mistral-moderation-latest",)
_OPENAI_DATED = re.compile(r"omni-moderation-\d{4}-\d{2}-\d{2}|text-moderation-\d{3}")
_MISTRAL_DATED = re.compile(r"mistral-moderation-\d{4}")

_UNCLEAN = re.compile(r"[^A-Za-z0-9._:/@+-]+")


def vendor_policy(model: str) -> str | None:
    """The built-in policy an OpenAI or Mistral moderation model name selects, if it is one."""
    if model in OPENAI_MODERATION_MODELS or _OPENAI_DATED.fullmatch(model):
        return OPENAI_POLICY
    if model in MISTRAL_MODERATION_MODELS or _MISTRAL_DATED.fullmatch(model):
        return MISTRAL_POLICY
    return None


def clean_id(model: str) -> str:
    """A model description as an id: `demo-tiny-random-mistral (random weights: ...)` ->
    `demo-tiny-random-mistral`; a checkpoint folder's name with other characters dashed."""
    head = model.split(" (", 1)[0]
    return _UNCLEAN.sub("-", head).strip("-") or "model"


@dataclass(frozen=True)
class ServedNames:
    """The served names of one server: `configured` (the flag's, maybe empty) and the loaded
    model's own name (GetModelInfoResponse.model), known once it has loaded."""

    configured: tuple[str, ...]

    def names(self, loaded: str) -> tuple[str, ...]:
        """Every served name, the one responses carry first."""
        if self.configured:
            return self.configured
        return (clean_id(loaded),)

    def primary(self, loaded: str) -> str:
        return self.names(loaded)[0]

    def serves(self, model: str, loaded: str) -> bool:
        """Whether `model` names the loaded model (its description is accepted too, as before
        the flag existed)."""
        return model in self.names(loaded) or model == loaded
