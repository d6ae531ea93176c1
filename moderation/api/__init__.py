"""The public API's edge: protobuf <-> core conversion and a light gRPC client. No torch in its
import graph."""
