"""OpenAI's chat completions vs the transcoded Generate routes: what the OpenAI shape costs.

One in-process server on the demo model (the model in the server's process), one caller on a
kept-alive HTTP/1.1 connection, the same generation (greedy, `--tokens` tokens) sent
interleaved call by call as `POST /v1/generate` and `POST /v1/chat/completions`, then streamed
as `POST /v1/generate/stream` (NDJSON) and `POST /v1/chat/completions` with `stream: true`
(server-sent events, read to `data: [DONE]`). Prints p50s and the chat/transcoded ratio per
round: above 1, the chat route costs more (its extra GetModelInfo call, JSON shaping, chunks).

    python bench/chat_bench.py [--requests N] [--rounds N] [--tokens N]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine
from model.demo import write_demo_checkpoint
from moderation.serving.logs import configure_logging
from tests.servers import demo_server, free_port

MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


def post(conn: http.client.HTTPConnection, path: str, body: dict[str, Any]) -> float:
    """One request, read to its end; its latency in seconds."""
    start = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - start
    assert response.status == 200, data[:200]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="calls per route per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8, help="tokens generated per call")
    args = parser.parse_args()
    configure_logging("warning")  # no line per request on the terminal
    print(machine())
    checkpoint = write_demo_checkpoint(Path(tempfile.mkdtemp()) / "demo")
    generate = {"messages": MESSAGES, "maxNewTokens": args.tokens}
    pairs = [
        ("plain", "/v1/generate", generate, {"max_tokens": args.tokens}),
        ("stream", "/v1/generate/stream", generate, {"max_tokens": args.tokens, "stream": True}),
    ]
    with demo_server(checkpoint, http_port=free_port()) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.settings.http_port, timeout=60)
        model = "demo-tiny-random-mistral"
        for name, path, body, chat in pairs:
            chat_body = {"model": model, "messages": MESSAGES, **chat}
            for _ in range(10):  # warm-up
                post(conn, path, body)
                post(conn, "/v1/chat/completions", chat_body)
            ratios = []
            for round_ in range(args.rounds):
                base, ours = [], []
                for _ in range(args.requests):  # interleaved: both see the same load
                    base.append(post(conn, path, body))
                    ours.append(post(conn, "/v1/chat/completions", chat_body))
                b, o = statistics.median(base) * 1000, statistics.median(ours) * 1000
                ratios.append(o / b)
                print(f"{name} round {round_ + 1}: {path} p50 {b:.2f} ms, "
                      f"/v1/chat/completions p50 {o:.2f} ms, ratio {o / b:.3f}")  # fmt: skip
            print(f"{name}: chat/transcoded p50 ratio, median of rounds "
                  f"{statistics.median(ratios):.3f}")  # fmt: skip
        conn.close()


if __name__ == "__main__":
    main()
