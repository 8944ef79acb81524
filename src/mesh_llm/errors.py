"""Errors whose message tells the user what to do; the CLI prints them without a traceback."""


class MeshError(Exception):
    """Base of every error meant for a person to read and act on."""


class StatusError(MeshError):
    """A refused request; `code` names the gRPC status (e.g. "INVALID_ARGUMENT") to answer with."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
