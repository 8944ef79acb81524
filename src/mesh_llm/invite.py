"""Invite tokens: the router's address, the mesh secret and its TLS fingerprint in one pasteable string."""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass

from mesh_llm.errors import MeshError

PREFIX = "mesh1_"


class BadInvite(MeshError):
    """An invite token that cannot be read."""


@dataclass(frozen=True, kw_only=True)
class Invite:
    router: str  # host:port of the router's gRPC service
    secret: str  # mesh secret that authenticates RegisterExpert
    fingerprint: str = ""  # sha256 (hex) of the router's TLS certificate, pinned by joiners; "" = no TLS


def new_secret() -> str:
    """A fresh random mesh secret."""
    return secrets.token_urlsafe(24)


def encode_invite(invite: Invite) -> str:
    """The token string a router prints and donors paste into --join."""
    fields = {"r": invite.router, "s": invite.secret, **({"f": invite.fingerprint} if invite.fingerprint else {})}
    raw = json.dumps(fields, separators=(",", ":")).encode()
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_invite(token: str) -> Invite:
    """Parse a token from encode_invite; BadInvite with a hint on anything else."""
    token = token.strip()
    if not token.startswith(PREFIX):
        raise BadInvite(f"invite token must start with {PREFIX!r}; copy the whole token the router printed")
    body = token[len(PREFIX):]
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return Invite(router=str(data["r"]), secret=str(data["s"]), fingerprint=str(data.get("f", "")))
    except (ValueError, KeyError, TypeError):
        raise BadInvite("invite token is damaged; copy the whole token the router printed") from None
