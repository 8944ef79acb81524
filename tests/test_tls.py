"""Optional TLS: the invite token pins the router's certificate; experts and clients refuse any other one."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_llm.auth import Credentials
from mesh_llm.expert.join import JoinRefused
from mesh_llm.expert.server import ExpertConfig, start_expert
from mesh_llm.grpc_util import CertificateMismatch, TlsFiles, channel
from mesh_llm.invite import decode_invite
from mesh_llm.models.loading import LoadOptions
from mesh_llm.node import RouterConfig, start_router
from mesh_llm.pb import router_pb2, router_pb2_grpc


def self_signed(folder: Path, name: str) -> TlsFiles:
    """A fresh self-signed certificate for localhost and 127.0.0.1, written as PEM files in folder."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    files = TlsFiles(cert=folder / f"{name}.crt", key=folder / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


@pytest.fixture
async def tls_router(tmp_path):
    """A router serving TLS with a self-signed certificate; yields (running router, its TlsFiles)."""
    files = self_signed(tmp_path, "router")
    router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'r.db'}", secret="s3cret",
                                             tls=files))
    try:
        yield router, files
    finally:
        await router.stop(0)


def _expert_config(loaded, invite, **kw) -> ExpertConfig:
    fields = dict(load=LoadOptions(model=loaded.model_id), port=0, measure_speed=False, router=invite.router,
                  secret=invite.secret, router_pin=invite.fingerprint)
    return ExpertConfig(**{**fields, **kw})


async def test_invite_pins_the_router_certificate_and_a_tls_expert_serves_generation(tiny_loaded, tls_router,
                                                                                     tmp_path, mesh_home):
    router, files = tls_router
    invite = decode_invite(router.invite)
    assert invite.fingerprint == files.fingerprint() and len(invite.fingerprint) == 64
    expert = await start_expert(_expert_config(tiny_loaded, invite, tls=self_signed(tmp_path, "expert")), tiny_loaded)
    try:
        await asyncio.wait_for(expert.link.registered.wait(), 20)
        operator = (mesh_home / "operator_key").read_text().strip()
        async with channel(router.address, credentials=Credentials(bearer=operator, pin=invite.fingerprint)) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            events = [e async for e in stub.Generate(router_pb2.GenerateRequest(prompt="hi", max_tokens=3, k=1),
                                                     timeout=60)]
        assert events[-1].done.finish_reason in ("length", "eos", "stop") and len(events) > 1
        async with channel(router.address, credentials=Credentials(bearer=operator)) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # plain TCP to a TLS port
                await router_pb2_grpc.RouterStub(plain).GetRouterStatus(router_pb2.RouterStatusRequest(), timeout=3)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await expert.stop(0)


async def test_a_different_router_certificate_is_refused_by_experts_and_clients(tiny_loaded, tls_router, tmp_path):
    router, _ = tls_router
    invite = decode_invite(router.invite)
    other = self_signed(tmp_path, "impostor").fingerprint()
    with pytest.raises(CertificateMismatch, match="refusing to connect"):
        channel(router.address, credentials=Credentials(pin=other))
    expert = await start_expert(_expert_config(tiny_loaded, invite, router_pin=other), tiny_loaded)
    try:
        link_task = expert.tasks[-1]
        with pytest.raises(JoinRefused, match=f"not the pinned sha256:{other}"):
            await asyncio.wait_for(link_task, 20)
        assert not router.registry.experts()
    finally:
        await expert.stop(0)
