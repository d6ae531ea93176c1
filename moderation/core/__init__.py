"""The moderation domain: policies, prompts, limits, decisions, the classifier and guarded
generation. Imports `model` and the standard library only (no grpc, asyncio or threads)."""
