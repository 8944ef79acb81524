"""Governance errors: each names what was refused and why, so the CLI and gRPC can report it."""

from __future__ import annotations

from mesh_llm.errors import MeshError


class GovernanceError(MeshError):
    """Base of every refusal by the governance subsystem."""

    grpc_code = "FAILED_PRECONDITION"  # name of the grpc.StatusCode the service answers with


class PolicyError(GovernanceError):
    """policy.toml or members.toml is missing, malformed or inconsistent."""


class KeyStoreError(GovernanceError):
    """A signing key is missing, already exists, or cannot be read."""


class MemberError(GovernanceError):
    """A member cannot be added (duplicate name or key, bad key)."""

    grpc_code = "INVALID_ARGUMENT"


class SignatureRefused(GovernanceError):
    """A signed message was refused before it could take effect."""

    grpc_code = "UNAUTHENTICATED"


class UnknownSigner(SignatureRefused):
    """The signer is not a member listed in members.toml."""


class BadSignature(SignatureRefused):
    """The signature does not match the message and the signer's public key."""


class StaleMessage(SignatureRefused):
    """The message timestamp is too far from the current time."""


class ReplayedNonce(SignatureRefused):
    """The nonce was already used by this signer."""


class Unsigned(SignatureRefused):
    """A request that must be signed by a member key came without a signature."""


class RoleForbidden(GovernanceError):
    """The signer is a proposer, which may submit proposals but not halt, resume or vote."""

    grpc_code = "PERMISSION_DENIED"


class InvalidMessage(GovernanceError):
    """A signed message's payload is malformed or meant for another operation."""

    grpc_code = "INVALID_ARGUMENT"


class InvalidProposal(GovernanceError):
    """A proposal does not match the proposal schema."""

    grpc_code = "INVALID_ARGUMENT"


class UnknownProposal(GovernanceError):
    """No proposal has this id."""

    grpc_code = "NOT_FOUND"


class ProposalClosed(GovernanceError):
    """The proposal no longer takes votes or results."""


class DoubleVote(GovernanceError):
    """This member already voted on this proposal (or for this resume)."""

    grpc_code = "ALREADY_EXISTS"


class PhaseForbidden(GovernanceError):
    """The proposal's tier is not enabled in the current phase."""

    grpc_code = "PERMISSION_DENIED"


class MeshHalted(GovernanceError):
    """The mesh is halted (read-only) until a quorum of members resumes it."""

    grpc_code = "UNAVAILABLE"


class NotHalted(GovernanceError):
    """A resume was sent while the mesh is not halted."""


class Unreachable(GovernanceError):
    """No governance service answered at the address given."""

    grpc_code = "UNAVAILABLE"


class ActionError(GovernanceError):
    """An action handler is missing, misdeclared or failed."""
