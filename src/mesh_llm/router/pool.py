"""Open channels to experts, one per address, reused across generations."""

from __future__ import annotations

import asyncio

from mesh_llm.auth import Credentials
from mesh_llm.grpc_util import channel
from mesh_llm.pb import expert_pb2_grpc


class ExpertPool:
    """Expert stubs keyed by address; channels stay open until close()."""

    def __init__(self) -> None:
        self._channels: dict[str, object] = {}
        self._stubs: dict[str, expert_pb2_grpc.ExpertStub] = {}
        self._credentials: dict[str, Credentials] = {}  # what each expert asked to be called with

    def remember(self, address: str, credentials: Credentials) -> None:
        """Call the expert at address with these credentials (its key, its certificate's fingerprint)."""
        self._credentials[address] = credentials

    def stub(self, address: str) -> expert_pb2_grpc.ExpertStub:
        """The stub for an expert's address, opening its channel on first use."""
        stub = self._stubs.get(address)
        if stub is None:
            ch = channel(address, credentials=self._credentials.get(address))
            self._channels[address] = ch
            stub = self._stubs[address] = expert_pb2_grpc.ExpertStub(ch)
        return stub

    async def forget(self, address: str) -> None:
        """Close and drop the channel of an address (after its expert is gone)."""
        ch = self._channels.pop(address, None)
        self._stubs.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        """Close every channel."""
        await asyncio.gather(*(ch.close() for ch in self._channels.values()), return_exceptions=True)
        self._channels.clear()
        self._stubs.clear()
