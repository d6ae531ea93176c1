"""The public API's edge: the light gRPC client (`client.ModerationClient`), protobuf <-> core
conversion, and the jobs' remote scoring on top of the client. No torch in its import graph;
`client` needs only grpc, protobuf and the `moderation.v1` stubs (the base distribution)."""
