"""mesh-llm: inter-model Mixture-of-Experts inference over gRPC."""

__version__ = "0.1.0"
