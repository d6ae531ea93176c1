"""The server: settings, the worker protocol, the scheduler tick, the worker thread, the model
process, metrics, logs, and the gRPC front (`serving.grpc`)."""
