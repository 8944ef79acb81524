"""Expert node: sessions with KV caches, the step engine and its gRPC service."""
