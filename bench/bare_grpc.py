"""A ModerationService whose Classify answers at once, with nothing behind it: grpcio's own
cost per call on this machine (the floor under the serving path's), for `service_bench.py`.

It runs as the server's front does (grpc.aio, the same interpreter settings once serving) but
with no interceptors, no planning, no model process: what is left is what any Python gRPC
server pays per call.

    python bench/bare_grpc.py PORT
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moderation.serving.interpreter import tune_front_process
from moderation.v1 import moderation_pb2 as pb
from moderation.v1 import moderation_pb2_grpc as pb_grpc


class BareServicer(pb_grpc.ModerationServiceServicer):
    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(category="acceptable", model="bare")


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ModerationServiceServicer_to_server(BareServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    tune_front_process()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
