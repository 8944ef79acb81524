"""Command-line layer: parse arguments, build a config, call the library."""
