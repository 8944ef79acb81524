"""Router: registry, K-of-N selection, aggregation, sampling and generation."""
