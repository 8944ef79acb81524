"""Signed governance messages: canonical bytes over payload, nonce and timestamp; verification."""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mesh_llm.governance.errors import BadSignature, InvalidMessage, StaleMessage, UnknownSigner

log = logging.getLogger(__name__)

DOMAIN = b"mesh-llm governance v1\n"  # keeps these signatures from meaning anything elsewhere


@dataclass(frozen=True, kw_only=True)
class SignedMessage:
    signer: str  # member name, as in members.toml
    payload: str  # JSON object text with an "action" field (halt, resume, vote)
    nonce: str  # random hex, used once per signer
    timestamp: float  # unix seconds when signed
    signature: bytes  # Ed25519 signature over signed_bytes()

    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers."""
        return signed_bytes(self.signer, self.payload, self.nonce, self.timestamp)


def signed_bytes(signer: str, payload: str, nonce: str, timestamp: float) -> bytes:
    """Canonical JSON of the signed fields, prefixed with the domain tag."""
    body = {"signer": signer, "payload": payload, "nonce": nonce, "timestamp": timestamp}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def canonical_payload(payload: Mapping[str, object]) -> str:
    """Payload dict as canonical JSON text."""
    return json.dumps(dict(payload), sort_keys=True, separators=(",", ":"))


def sign(key: Ed25519PrivateKey, signer: str, payload: Mapping[str, object],
         *, clock: Callable[[], float] = time.time) -> SignedMessage:
    """Sign payload as signer with a fresh nonce and the current time."""
    text = canonical_payload(payload)
    nonce = secrets.token_hex(16)
    timestamp = float(clock())
    signature = key.sign(signed_bytes(signer, text, nonce, timestamp))
    return SignedMessage(signer=signer, payload=text, nonce=nonce, timestamp=timestamp, signature=signature)


def verify(msg: SignedMessage, members: Mapping[str, Ed25519PublicKey], *, now: float, max_skew_s: float) -> dict:
    """Check signer, signature and freshness (not the nonce); return the payload as a dict."""
    public = members.get(msg.signer)
    if public is None:
        raise UnknownSigner(f"{msg.signer!r} is not a member")
    try:
        public.verify(msg.signature, msg.signed_bytes())
    except InvalidSignature:
        raise BadSignature(f"signature by {msg.signer!r} does not verify") from None
    if not math.isfinite(msg.timestamp) or abs(now - msg.timestamp) > max_skew_s:
        raise StaleMessage(f"message from {msg.signer!r} is {now - msg.timestamp:.0f} s old (limit {max_skew_s:g} s)")
    if not 8 <= len(msg.nonce) <= 128:
        raise InvalidMessage("nonce must have 8 to 128 characters")
    try:
        payload = json.loads(msg.payload)
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidMessage("payload must be a JSON object")
    return payload
