"""What gateways and probes ask before any work: `GET /v1/models` (OpenAI's list shape),
`GET /health` (vLLM's route: 200 while SERVING, 503 otherwise), and the `Server` header.

`/v1/models` lists the served names first (`--served-model-name`; the first is the generating
model of /v1/chat/completions), then the names the moderation routes accept besides: OpenAI's
and Mistral's moderation model names and the policies, each with the policy it selects under
`moderation_policy` (an extra field; OpenAI's SDK keeps it in `model_extra`);
`/v1/models/{model}` is one of them, or 404 model_not_found.

`/health` needs no token and says nothing but its status: an empty body, no model, no version.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web, web_response

from moderation.core.errors import quote
from moderation.serving.http.compat import Call
from moderation.serving.http.names import (
    MISTRAL_MODERATION_MODELS,
    MISTRAL_POLICY,
    OPENAI_MODERATION_MODELS,
    OPENAI_POLICY,
    ServedNames,
)
from moderation.serving.http.status import CallError
from moderation.v1 import moderation_pb2 as pb

MODELS_PATH = "/v1/models"
MODEL_PATH = "/v1/models/{model:.+}"  # ids may hold a "/" (mistralai/Mistral-7B-...)
HEALTH_PATH = "/health"
OWNER = "mistral-moderation"
SERVER = "mistral-moderation"  # no version: nothing for a scanner to match against advisories
_STARTED = int(time.time())


def _model(name: str, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": OWNER, **extra}


async def models(call: Call, names: ServedNames) -> dict[str, Any]:
    info = await call("GetModelInfo", pb.GetModelInfoRequest())
    served = names.names(info.model)
    # root and max_model_len as vLLM lists its served names (gateways read the context length)
    data = [_model(name, root=served[0], max_model_len=info.max_context_tokens) for name in served]
    moderation = [(m, OPENAI_POLICY) for m in OPENAI_MODERATION_MODELS]
    moderation += [(m, MISTRAL_POLICY) for m in MISTRAL_MODERATION_MODELS]
    moderation += [(p.name, p.name) for p in info.policies]
    data += [_model(m, moderation_policy=p) for m, p in moderation if m not in served]
    return {"object": "list", "data": data}


async def one_model(call: Call, names: ServedNames, model: str) -> dict[str, Any]:
    for entry in (await models(call, names))["data"]:
        if entry["id"] == model:
            return dict(entry)
    raise CallError(grpc.StatusCode.NOT_FOUND, f"The model {quote(model)} does not exist", "model")


def health_handler(serving: Callable[[], bool]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200 if serving() else 503)

    return health


def hide_server_version() -> None:
    """aiohttp sends its own and Python's versions (`Server: Python/3.11 aiohttp/3.9`) on every
    answer, its own 400s to malformed requests included, which no application hook reaches:
    they read this module constant when their headers are written, so it is replaced here."""
    web_response.SERVER_SOFTWARE = SERVER
