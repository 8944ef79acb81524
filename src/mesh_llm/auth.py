"""Credentials on gRPC calls: what each caller sends, and the server interceptors that check it.

A router accepts, per method (as `authorization: Bearer TOKEN` metadata):
- RegisterExpert: the mesh secret from the invite token; the reply carries the expert's own token;
- Heartbeat, Deregister: that expert token ("EXPERT_ID.MAC", MAC = HMAC-SHA256 of the id under the mesh
  secret), so the mesh secret crosses the network once per registration, not in every heartbeat;
- every other Router, Governance and Agent call: an API key (--api-key, MESH_HOME/api_keys) or the operator
  key the router keeps in MESH_HOME/operator_key;
- HaltMesh, ResumeMesh, CastVote and SubmitProposal: no key, because each carries a member's signature that
  the Governance service checks (a member can always halt, and the author is the signer);
- health checking and reflection: nothing, so stock tools keep working.

An expert accepts its Expert calls only with its own key in `x-mesh-expert-key` metadata. The expert sends
that key to the router in RegisterExpert (over the channel that pinned the router's certificate), so the router
that registered it, and processes on the expert's machine that can read MESH_HOME/expert_key, may call Step.

Clients that pass no credential send the local ones, and only to loopback addresses: MESH_API_KEY (to any
address), else the operator key, else the first API key; and MESH_HOME/expert_key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from mesh_llm.errors import MeshError
from mesh_llm.paths import mesh_home

BEARER = "authorization"
EXPERT_KEY = "x-mesh-expert-key"
OPERATOR_KEY_FILE = "operator_key"
EXPERT_KEY_FILE = "expert_key"
API_KEY_ENV = "MESH_API_KEY"
PIN_ENV = "MESH_TLS_PIN"
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
SIGNED_METHODS = frozenset({"/mesh_llm.v1.Governance/HaltMesh", "/mesh_llm.v1.Governance/ResumeMesh",
                            "/mesh_llm.v1.Governance/CastVote", "/mesh_llm.v1.Governance/SubmitProposal"})
REGISTER = "/mesh_llm.v1.Router/RegisterExpert"
EXPERT_METHODS = frozenset({"/mesh_llm.v1.Router/Heartbeat", "/mesh_llm.v1.Router/Deregister"})


@dataclass(frozen=True, kw_only=True)
class Credentials:
    bearer: str = ""  # sent as `authorization: Bearer ...` (API key, mesh secret or expert token)
    expert_key: str = ""  # sent as x-mesh-expert-key to an expert
    pin: str = ""  # sha256 fingerprint (hex) the server's TLS certificate must have; "" = no TLS

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying these credentials."""
        pairs = []
        if self.bearer:
            pairs.append((BEARER, f"Bearer {self.bearer}"))
        if self.expert_key:
            pairs.append((EXPERT_KEY, self.expert_key))
        return tuple(pairs)


def new_local_key() -> str:
    """A fresh random key for MESH_HOME/operator_key or MESH_HOME/expert_key."""
    return "mesh-" + secrets.token_urlsafe(24)


def private_key_file(name: str, make: Callable[[], str] = new_local_key) -> str:
    """The key in MESH_HOME/name, made (0600, by make()) on first use; refused when others can read it."""
    from mesh_llm.governance.keys import require_private

    path = mesh_home() / name
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(make())
    require_private(path, MeshError)
    return path.read_text().strip()


def _read_private(path: Path) -> str:
    from mesh_llm.governance.keys import require_private

    if not path.exists():
        return ""
    require_private(path, MeshError)
    return path.read_text().strip()


def local_credentials(address: str) -> Credentials:
    """The credentials this machine sends to address when a caller names none (see the module docstring)."""
    from mesh_llm.api.keys import is_loopback, load_keys

    host = address.rsplit(":", 1)[0].strip("[]")
    env_key = os.environ.get(API_KEY_ENV, "").strip()
    pin = os.environ.get(PIN_ENV, "").strip().lower().replace(":", "")
    if not is_loopback(host):
        return Credentials(bearer=env_key, pin=pin)
    home = mesh_home()
    bearer = env_key or _read_private(home / OPERATOR_KEY_FILE) or next(iter(load_keys()), "")
    return Credentials(bearer=bearer, expert_key=_read_private(home / EXPERT_KEY_FILE), pin=pin)


def expert_token(secret: str, expert_id: str) -> str:
    """The token the router issues an expert at registration: its id and a MAC under the mesh secret."""
    mac = hmac.new(secret.encode(), b"expert-token\0" + expert_id.encode(), hashlib.sha256).hexdigest()
    return f"{expert_id}.{mac}"


def token_expert(secret: str, token: str) -> str | None:
    """The expert id a token from expert_token stands for; None when it was not issued with this secret."""
    expert_id = token.rpartition(".")[0]
    if expert_id and hmac.compare_digest(expert_token(secret, expert_id).encode(), token.encode()):
        return expert_id
    return None


def bearer_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of the `authorization: Bearer ...` entry of call metadata ("" when absent)."""
    return _value(metadata, BEARER).removeprefix("Bearer ").strip()


def _value(metadata, name: str) -> str:
    for key, value in metadata or ():
        if key == name:
            return value.decode() if isinstance(value, bytes) else value
    return ""


def matches_any(given: str, keys: Iterable[str]) -> bool:
    """True when given is one of keys (each compared in constant time); never for an empty given."""
    from mesh_llm.api.keys import key_matches

    return bool(given) and key_matches(given, tuple(keys))


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as handler that answers UNAUTHENTICATED with message."""
    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class _CheckingInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED (and counts it) when refusal() names what a call lacks."""

    def __init__(self, on_refused: Callable[[str], None] | None = None) -> None:
        """on_refused(method) is told of every call refused."""
        self.on_refused = on_refused or (lambda method: None)

    def refusal(self, method: str, metadata) -> str | None:
        """Why a call lacks credentials (the message names what to pass), or None to let it through."""
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        """Let the call through, or answer UNAUTHENTICATED saying which credential to pass."""
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        message = self.refusal(method, handler_call_details.invocation_metadata)
        if message is None:
            return handler
        self.on_refused(method)
        return _refusal(handler, message)


class RouterAuth(_CheckingInterceptor):
    """The router's check of every call: mesh secret, expert token, API key or signed governance message."""

    def __init__(self, *, secret: str, client_keys: Iterable[str],
                 on_refused: Callable[[str], None] | None = None) -> None:
        """Accept registrations with secret and client calls with any of client_keys."""
        super().__init__(on_refused)
        self.secret = secret
        self.client_keys = tuple(k for k in client_keys if k)

    def refusal(self, method: str, metadata) -> str | None:
        """Why this router call lacks credentials, or None."""
        token = bearer_of(metadata)
        if method in SIGNED_METHODS:
            return None
        if method == REGISTER:
            if matches_any(token, [self.secret]):
                return None
            return ("RegisterExpert needs the mesh secret as `authorization: Bearer SECRET` metadata; "
                    "join with the invite token `mesh router serve` printed (--join)")
        if method in EXPERT_METHODS:
            if token_expert(self.secret, token) is not None:
                return None
            return (f"{method.rsplit('/', 1)[1]} needs the expert token RegisterExpert returned as "
                    "`authorization: Bearer TOKEN` metadata; register again")
        if matches_any(token, self.client_keys):
            return None
        return (f"{method.rsplit('/', 1)[1]} needs an API key as `authorization: Bearer KEY` metadata: set "
                f"{API_KEY_ENV} to a key of `mesh router serve --api-key` or MESH_HOME/api_keys (on the router's "
                f"machine, MESH_HOME/{OPERATOR_KEY_FILE} is used by itself)")


class ExpertAuth(_CheckingInterceptor):
    """The expert's check: its own key in x-mesh-expert-key on every Expert call."""

    def __init__(self, key: str, on_refused: Callable[[str], None] | None = None) -> None:
        """Accept calls that carry key."""
        super().__init__(on_refused)
        self.key = key

    def refusal(self, method: str, metadata) -> str | None:
        """Why this expert call lacks the expert's key, or None."""
        if matches_any(_value(metadata, EXPERT_KEY), [self.key]):
            return None
        return (f"{method.rsplit('/', 1)[1]} needs this expert's key as `{EXPERT_KEY}` metadata: only the router "
                f"it registered with (or a process reading MESH_HOME/{EXPERT_KEY_FILE} on its machine) may call it")
