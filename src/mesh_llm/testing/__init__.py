"""Test support for tests, benchmarks and smoke runs: tiny models, governance members, clocks (not product code)."""
