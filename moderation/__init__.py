"""Content moderation on Mistral 7B Instruct: policies, classifier, guarded generation, gRPC."""
