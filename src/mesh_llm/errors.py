"""Errors whose message tells the user what to do; the CLI prints them without a traceback."""


class MeshError(Exception):
    """Base of every error meant for a person to read and act on."""
