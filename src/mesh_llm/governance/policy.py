"""policy.toml and members.toml: loading, validation with clear errors, adding members."""

from __future__ import annotations

import base64
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mesh_llm.governance.errors import MemberError, PolicyError
from mesh_llm.governance.tiers import Tier
from mesh_llm.paths import mesh_home

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Quorum = int | Literal["majority", "all"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TierRule(_Strict):
    """How proposals of one tier are approved and what happens to them."""

    approval: str = Field(min_length=1)  # a person-readable name of the rule
    applies: bool  # an approved proposal changes the mesh (False: it is only recorded)
    approvals: Quorum = Field(default=0)  # approve votes needed (capped at the member count)
    sandbox: bool = False  # needs a passing sandbox validation before it is approved
    timelock_s: float = Field(default=0.0, ge=0)  # earliest application, counted from submission
    rollback: Literal["none", "automatic", "manual"] = "none"  # what a reported regression does

    @field_validator("approvals")
    @classmethod
    def _non_negative(cls, value: Quorum) -> Quorum:
        if isinstance(value, int) and value < 0:
            raise ValueError("approvals must be >= 0, 'majority' or 'all'")
        return value


class PhaseRule(_Strict):
    """Which tiers and features one phase enables."""

    description: str = ""
    tiers: list[Tier]
    features: list[str] = Field(default_factory=list)


class Signatures(_Strict):
    max_skew_s: float = Field(default=300.0, gt=0)  # older or newer messages are refused as stale
    refusal_window_s: float = Field(default=60.0, gt=0)  # unauthenticated refusals: one grouped audit row per window


class KillSwitch(_Strict):
    revert_last: int = Field(default=3, ge=0)  # applied actions reverted by a halt
    resume_quorum: Quorum = 2  # signed resume votes that lift a halt (capped at the member count)


class Policy(_Strict):
    """The whole governance policy."""

    version: Literal[1] = 1
    initial_phase: int = 1
    signatures: Signatures = Field(default_factory=Signatures)
    kill_switch: KillSwitch = Field(default_factory=KillSwitch)
    tiers: dict[Tier, TierRule]
    phases: dict[int, PhaseRule]

    @model_validator(mode="after")
    def _complete(self) -> Policy:
        missing = [t.value for t in Tier if t not in self.tiers]
        if missing:
            raise ValueError(f"tiers missing rules: {missing}")
        if sorted(self.phases) != [0, 1, 2, 3]:
            raise ValueError(f"phases must be exactly 0, 1, 2, 3 (got {sorted(self.phases)})")
        if self.initial_phase not in self.phases:
            raise ValueError(f"initial_phase {self.initial_phase} is not a defined phase")
        return self

    def required(self, quorum: Quorum, members: int) -> int:
        """Votes needed for a quorum spec among this many members (at least 1 when the spec asks for any)."""
        if quorum == "all":
            wanted = members
        elif quorum == "majority":
            wanted = members // 2 + 1
        else:
            wanted = quorum
        if wanted <= 0:
            return 0
        return max(1, min(wanted, members))


class Member(_Strict):
    """One governance member and the Ed25519 public key that signs for them."""

    name: str = Field(pattern=NAME_PATTERN)
    public_key: str  # base64 of the 32 raw public-key bytes
    role: Literal["member", "proposer"] = "member"  # a proposer signs proposals only and counts in no quorum

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        try:
            raw = base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise ValueError(f"not base64: {exc}") from None
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
        return value


class Members(_Strict):
    member: list[Member] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Members:
        names = [m.name for m in self.member]
        keys = [m.public_key for m in self.member]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate member names in {names}")
        if len(set(keys)) != len(keys):
            raise ValueError("two members share one public key")
        return self


@dataclass(frozen=True, kw_only=True)
class TrustRoot:
    path: Path  # folder holding policy.toml and members.toml
    source: str  # how it was chosen: "--governance", "MESH_GOVERNANCE_DIR" or "MESH_HOME"

    def describe(self) -> str:
        """One line naming the folder and why it was used."""
        why = {"--governance": "given with --governance", "MESH_GOVERNANCE_DIR": "from $MESH_GOVERNANCE_DIR",
               "MESH_HOME": "the default, MESH_HOME/governance"}[self.source]
        return f"governance trust root: {self.path} ({why})"


def trust_root(explicit: Path | None = None) -> TrustRoot:
    """The governance folder: explicit, else $MESH_GOVERNANCE_DIR, else MESH_HOME/governance (seeded); never cwd."""
    if explicit is not None:
        return TrustRoot(path=Path(explicit).expanduser(), source="--governance")
    env = os.environ.get("MESH_GOVERNANCE_DIR")
    if env:
        return TrustRoot(path=Path(env).expanduser(), source="MESH_GOVERNANCE_DIR")
    home = mesh_home() / "governance"
    seed_policy(home)
    return TrustRoot(path=home, source="MESH_HOME")


def governance_dir(explicit: Path | None = None) -> Path:
    """The folder trust_root(explicit) names."""
    return trust_root(explicit).path


def seed_policy(folder: Path) -> None:
    """Write the packaged default policy.toml into folder unless it already has one."""
    target = folder / "policy.toml"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        target.write_text(resources.files("mesh_llm.governance").joinpath("default_policy.toml").read_text())
        log.info("wrote the default governance policy to %s; edit it there", target)


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise PolicyError(f"{path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path} is not valid TOML: {exc}") from None


def _explain(path: Path, exc: ValidationError) -> PolicyError:
    lines = [f"{path} is invalid:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return PolicyError("\n".join(lines))


def load_policy(path: Path) -> Policy:
    """Read and validate policy.toml; raise PolicyError naming every bad field."""
    data = _read_toml(path)
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise _explain(path, exc) from None


def load_members(path: Path) -> list[Member]:
    """Read and validate members.toml (a missing file means no members yet)."""
    if not path.exists():
        log.warning("no members file at %s: no one can sign", path)
        return []
    try:
        return Members.model_validate(_read_toml(path)).member
    except ValidationError as exc:
        raise _explain(path, exc) from None


def add_member(path: Path, name: str, public_key: str, *, role: str = "member") -> Member:
    """Append a member (or a proposer) to members.toml after checking it against the existing ones."""
    try:
        member = Member(name=name, public_key=public_key.strip(), role=role)
    except ValidationError as exc:
        raise MemberError(f"cannot add {name!r}: " + "; ".join(e["msg"] for e in exc.errors())) from None
    existing = load_members(path)
    if any(m.name == member.name for m in existing):
        raise MemberError(f"{name!r} is already a member in {path}")
    if any(m.public_key == member.public_key for m in existing):
        raise MemberError(f"that public key already belongs to a member in {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # name and key were validated against strict patterns, so this TOML needs no escaping
    with path.open("a") as fh:
        role_line = f'role = "{member.role}"\n' if member.role != "member" else ""
        fh.write(f'\n[[member]]\nname = "{member.name}"\npublic_key = "{member.public_key}"\n{role_line}')
    load_members(path)
    log.info("added member %s to %s", member.name, path)
    return member


class TrustRootWatch:
    """Notices edits of a trust root's policy.toml and members.toml (by content) between two looks."""

    FILES = ("policy.toml", "members.toml")

    def __init__(self, folder: Path) -> None:
        """Watch folder; its files as they are now count as seen."""
        self.folder = folder
        self._seen = self._contents()

    def _contents(self) -> dict[str, bytes | None]:
        found: dict[str, bytes | None] = {}
        for name in self.FILES:
            try:
                found[name] = (self.folder / name).read_bytes()
            except FileNotFoundError:
                found[name] = None
        return found

    def changed(self) -> list[str]:
        """Names of the files whose content differs from the last look (they count as seen from now on)."""
        now = self._contents()
        names = [name for name in self.FILES if now[name] != self._seen[name]]
        self._seen = now
        return names
