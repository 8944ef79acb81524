"""API keys: given on the command line or kept in MESH_HOME/api_keys; checked in constant time."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from mesh_llm.errors import MeshError
from mesh_llm.governance.keys import require_private
from mesh_llm.paths import mesh_home

KEYS_FILE = "api_keys"


def keys_file() -> Path:
    """MESH_HOME/api_keys: one key a line, '#' starts a comment."""
    return mesh_home() / KEYS_FILE


def load_keys(path: Path | None = None) -> list[str]:
    """The keys in the keys file (none when it does not exist); refused when group or others can read it."""
    path = path or keys_file()
    if not path.exists():
        return []
    require_private(path, MeshError)
    keys = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [k for k in keys if k]


def new_key(path: Path | None = None) -> str:
    """Make a random key, append it to the keys file (mode 0600) and return it."""
    path = path or keys_file()
    key = "mesh-" + secrets.token_urlsafe(24)
    if path.exists():
        require_private(path, MeshError)  # never add a key to a file others can read
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(key + "\n")
    return key


def check_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """The keys as a tuple; MeshError on a key with spaces or shorter than 8 characters."""
    keys = tuple(keys)
    for key in keys:
        if len(key) < 8 or any(c.isspace() for c in key):
            raise MeshError("an API key must be at least 8 characters without spaces; make one with "
                            "`mesh router serve --new-api-key`")
    return keys


def key_matches(given: str, keys: tuple[str, ...]) -> bool:
    """True when given equals one of keys (every key compared, in constant time)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def is_loopback(host: str) -> bool:
    """Whether host (an address or "localhost") is on this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
