"""Model catalog, fetching, loading and tokenizer fingerprints."""
