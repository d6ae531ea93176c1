"""Generated gRPC code for moderation.v1 (do not edit; run python protos/generate.py)."""
