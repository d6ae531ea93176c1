"""gRPC front of the server: interceptors, the ModerationService servicer, the server's life."""
