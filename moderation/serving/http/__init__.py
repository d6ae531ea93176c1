"""The server's HTTP/JSON listener (`--http-port`, MODERATION_HTTP_PORT; 0 = off).

What it serves: every ModerationService RPC at the path of its google.api.http annotation
(`transcoding`), OpenAI's `POST /v1/moderations` and Mistral's `POST /v1/chat/moderations`
(`compat`), OpenAI's `POST /v1/chat/completions` on guarded generation (`chat`, `chat_route`),
`GET /v1/models` and `GET /health` (`discovery`), the model names they answer to (`names`),
with JSON errors (`status`).

The stack is aiohttp's server (AppRunner + TCPSite): it runs as coroutines on the event loop
that grpc.aio already runs on, so one process, one loop and one servicer answer both ports, with
no thread hand-off and no second model; TLS is an ssl.SSLContext built from the gRPC port's
certificate settings; streaming answers are plain chunked writes. (uvicorn + starlette would fit
too, through `uvicorn.Server.serve()`, but bring two packages and an ASGI layer for the same
result; a WSGI server would need threads.)

How a request is answered: in-process, by the gRPC servicer itself, called with a small context
(`context.HttpContext`) that records its abort status and details; not by forwarding to the
server's own gRPC port over a loopback channel. In-process, an HTTP call costs one JSON parse and
one servicer call (no second serialization, no HTTP/2 hop), needs no client certificate when the
gRPC port requires mutual TLS, and every check of the servicer (readiness, draining, limits,
field validation, queue size) applies unchanged. What the gRPC interceptors do at the door is
done here by the listener's middleware with the same pieces (`moderation.serving.calls`): the
same bearer token (constant-time compare), request id (`x-request-id`, honoured and echoed), one
log line per request at the same levels, and metrics of its own (`http_server_*`), so that the
grpc_server_* series keep counting gRPC calls only.
"""
