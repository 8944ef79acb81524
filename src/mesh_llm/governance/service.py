"""gRPC Governance service over a Governance object (grpc.aio)."""

from __future__ import annotations

import inspect
import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.exc import OperationalError

from mesh_llm.governance import convert
from mesh_llm.governance.core import Governance
from mesh_llm.governance.errors import GovernanceError
from mesh_llm.governance.policy import TrustRootWatch, load_policy
from mesh_llm.pb import governance_pb2 as pb
from mesh_llm.pb import governance_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Governance"].full_name


class GovernanceServicer(pb_grpc.GovernanceServicer):
    """Answers Governance RPCs; a refusal becomes a status code carrying the error's message."""

    def __init__(self, governance: Governance) -> None:
        """Serve this Governance; edits of its trust root's files take effect at the next call."""
        self.gov = governance
        self._root = TrustRootWatch(governance.root.path) if governance.root is not None else None
        self._reload_lock = threading.Lock()

    def _reload_edited(self) -> None:
        """Re-read policy.toml and members.toml if they changed since the last call (`mesh members add`, an edit)."""
        if self._root is None:
            return
        with self._reload_lock:
            edited = self._root.changed()
            try:
                if "policy.toml" in edited:
                    self.gov.policy = load_policy(self._root.folder / "policy.toml")
                    log.info("reloaded %s", self._root.folder / "policy.toml")
                if "members.toml" in edited:
                    self.gov.reload_members()
            except GovernanceError as exc:
                log.error("%s; governance keeps the files it had until they are fixed", exc)

    async def _call(self, context: grpc.aio.ServicerContext, fn, *args, **kwargs):
        try:
            result = fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        except GovernanceError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.grpc_code), f"{type(exc).__name__}: {exc}")
        except OperationalError as exc:  # e.g. SQLite still locked by another writer after its busy timeout
            log.warning("governance store unavailable: %s", exc.orig)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the governance store is busy or unreachable "
                                f"({exc.orig}); sign and send it again")

    async def _store(self, context: grpc.aio.ServicerContext, fn, *args, **kwargs):
        """fn on the store in a worker thread (see Governance.off_loop); a refusal becomes a status code."""
        await self.gov.off_loop(self._reload_edited)
        return await self._call(context, self.gov.off_loop, fn, *args, **kwargs)

    async def HaltMesh(self, request, context):  # noqa: N802
        """Halt the mesh on a signed halt; stored off the event loop, so streams stop while it is written."""
        state = await self._store(context, self.gov.halt, convert.signed_from_pb(request))
        return convert.halt_to_pb(state)

    async def ResumeMesh(self, request, context):  # noqa: N802
        """Count a signed resume vote."""
        state = await self._store(context, self.gov.resume, convert.signed_from_pb(request))
        return convert.halt_to_pb(state)

    async def GetHaltState(self, request, context):  # noqa: N802
        """Current halt state."""
        return convert.halt_to_pb(await self._store(context, self.gov.halt_state))

    async def SubmitProposal(self, request, context):  # noqa: N802
        """Submit a proposal signed by a member or proposer key; the author is the signer, never a request field."""
        signed = convert.signed_from_pb(request.signed) if request.HasField("signed") else None
        view = await self._store(context, self.gov.propose, signed)
        return convert.proposal_to_pb(view)

    async def ListProposals(self, request, context):  # noqa: N802
        """Proposals, newest first."""
        views = await self._store(context, self.gov.proposals, request.status or None)
        return pb.ListProposalsReply(proposals=[convert.proposal_to_pb(v) for v in views])

    async def GetProposal(self, request, context):  # noqa: N802
        """One proposal."""
        return convert.proposal_to_pb(await self._store(context, self.gov.proposal, request.id))

    async def CastVote(self, request, context):  # noqa: N802
        """Count a signed vote."""
        view = await self._store(context, self.gov.vote, convert.signed_from_pb(request))
        return convert.proposal_to_pb(view)

    async def GetPhase(self, request, context):  # noqa: N802
        """Current phase."""
        info = await self._store(context, self.gov.phase)
        return pb.PhaseState(phase=info.phase, description=info.rule.description,
                             tiers=[t.value for t in info.rule.tiers], features=info.rule.features)

    async def GetAudit(self, request, context):  # noqa: N802
        """Audit rows and, when asked, the chain check."""
        rows = await self._store(context, self.gov.audit_rows, request.limit or None)
        reply = pb.GetAuditReply(rows=[convert.audit_to_pb(r) for r in rows])
        if request.verify:
            reply.verification.CopyFrom(convert.verify_to_pb(await self._store(context, self.gov.verify_audit)))
        return reply


def add_to_server(server: grpc.aio.Server, governance: Governance) -> GovernanceServicer:
    """Register the Governance service on a server (the router's, or a standalone one)."""
    servicer = GovernanceServicer(governance)
    pb_grpc.add_GovernanceServicer_to_server(servicer, server)
    return servicer


async def start_server(governance: Governance, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """Start a standalone server with Governance, health checking and reflection; return it and its port."""
    server = grpc.aio.server()
    add_to_server(server, governance)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    await server.start()
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info("governance service on port %d", port)
    return server, port
