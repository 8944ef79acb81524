"""Ed25519 key pairs of members, kept under MESH_HOME/keys/NAME.key with 0600 permissions."""

from __future__ import annotations

import base64
import logging
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh_llm.errors import MeshError
from mesh_llm.governance.errors import KeyStoreError
from mesh_llm.governance.policy import NAME_PATTERN
from mesh_llm.paths import mesh_home

log = logging.getLogger(__name__)


def require_private(path: Path, error: type[MeshError] = KeyStoreError) -> None:
    """Refuse a secret file that group or others may read or write, naming the chmod that fixes it."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise error(f"{path} is readable by others (mode {mode:o}: group or world); run `chmod 600 {path}`")


def keys_dir() -> Path:
    """Folder holding private keys (created 0700)."""
    path = mesh_home() / "keys"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def key_path(name: str) -> Path:
    """Where the private key called name lives."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise KeyStoreError(f"bad key name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    return keys_dir() / f"{name}.key"


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Base64 of the 32 raw public-key bytes, the form members.toml holds."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """Ed25519 public key from its base64 form."""
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))


def new_key(name: str) -> str:
    """Create and store a new private key called name; return its base64 public key."""
    path = key_path(name)
    if path.exists():
        raise KeyStoreError(f"a key named {name!r} already exists at {path}")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    log.info("created key %s at %s", name, path)
    return public_key_b64(key)


def load_key(name: str) -> Ed25519PrivateKey:
    """The private key called name; refuse one readable by group or others."""
    path = key_path(name)
    if not path.exists():
        raise KeyStoreError(f"no key named {name!r} in {path.parent}; create it with `mesh keys new {name}`")
    require_private(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise KeyStoreError(f"{path} is not a readable private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyStoreError(f"{path} is not an Ed25519 key")
    return key


def key_names() -> list[str]:
    """Names of the private keys under MESH_HOME/keys, sorted."""
    return sorted(p.stem for p in keys_dir().glob("*.key"))


def public_key_of(name: str) -> str:
    """The base64 public key of the stored private key called name (to paste into `mesh members add`)."""
    return public_key_b64(load_key(name))
