"""Shared gRPC plumbing: servers with health checking and reflection, channels with credentials and limits.

TLS is optional. A server given a certificate and key serves only TLS; a client given the certificate's
sha256 fingerprint (the invite token carries the router's) fetches the certificate the server presents,
refuses it unless its fingerprint matches, and then trusts that certificate alone (self-signed certificates
work: the name checked is the one inside the pinned certificate).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh_llm.auth import Credentials, local_credentials
from mesh_llm.errors import MeshError

DEFAULT_MAX_MESSAGE = 4 << 20


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, int]]:
    """Channel/server options bounding message sizes both ways."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def new_server(max_message_bytes: int = DEFAULT_MAX_MESSAGE, interceptors=()) -> grpc.aio.Server:
    """An asyncio gRPC server with bounded message sizes (and these server interceptors, e.g. auth checks)."""
    return grpc.aio.server(options=message_options(max_message_bytes) + [("grpc.so_reuseport", 0)],
                           interceptors=list(interceptors))


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    """Register standard health checking (NOT_SERVING until told) and reflection for the named services."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, service_names: list[str], serving: bool) -> None:
    """Mark the overall server and each named service SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await servicer.set(name, status)


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    cert: Path  # PEM certificate the server presents
    key: Path  # PEM private key of that certificate

    def fingerprint(self) -> str:
        """sha256 (hex) of the certificate, as invite tokens carry it."""
        return fingerprint_pem(self.cert.read_bytes())


def fingerprint_pem(pem: bytes) -> str:
    """sha256 (hex) of a PEM certificate's DER bytes."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()


def bind(server: grpc.aio.Server, host: str, port: int, tls: TlsFiles | None = None) -> int:
    """Listen on host:port (0 picks a free port), with TLS when tls is given; returns the port bound."""
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if tls is None:
            bound = server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials([(tls.key.read_bytes(), tls.cert.read_bytes())])
            bound = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise MeshError(f"could not listen on {address} ({exc}); is the port in use? "
                        "pick another with --port") from None
    if bound == 0:
        raise MeshError(f"could not listen on {address}; is the port in use? pick another with --port")
    return bound


class CertificateMismatch(MeshError):
    """The server presented a TLS certificate other than the pinned one."""


def pinned_certificate(address: str, pin: str, timeout_s: float = 5.0) -> bytes:
    """The PEM certificate the server at address presents; CertificateMismatch unless its sha256 is pin."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # verified below by its fingerprint, then by gRPC against itself
            context.set_alpn_protocols(["h2"])
            with context.wrap_socket(sock) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError) as exc:
        raise MeshError(f"could not fetch the TLS certificate of {address} ({exc}); is it serving TLS there?") from None
    got = hashlib.sha256(der).hexdigest()
    if got != pin.lower():
        raise CertificateMismatch(f"{address} presented TLS certificate sha256:{got}, not the pinned sha256:{pin}; "
                                  "refusing to connect (take a fresh invite token from the router's operator)")
    return ssl.DER_cert_to_PEM_cert(der).encode()


def _certificate_name(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
        ips = names.get_values_for_type(x509.IPAddress)
        if ips:
            return str(ips[0])
    except x509.ExtensionNotFound:
        pass
    common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(common[0].value) if common else "localhost"


class _AddMetadata:
    """Adds fixed metadata (the caller's credentials) to the calls of an asyncio channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _UnaryUnary(_AddMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStream(_AddMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamUnary(_AddMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStream(_AddMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def _secure_options(address: str, pin: str) -> tuple[grpc.ChannelCredentials, list[tuple[str, str]]]:
    pem = pinned_certificate(address, pin)
    return grpc.ssl_channel_credentials(root_certificates=pem), [("grpc.ssl_target_name_override",
                                                                  _certificate_name(pem))]


def channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE, *,
            credentials: Credentials | None = None) -> grpc.aio.Channel:
    """An asyncio channel to host:port sending credentials (default: this machine's, see auth), TLS when pinned."""
    creds = local_credentials(address) if credentials is None else credentials
    options = message_options(max_message_bytes)
    metadata = creds.metadata()
    interceptors = [kind(metadata) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)] if metadata \
        else None
    if not creds.pin:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    tls, names = _secure_options(address, creds.pin)
    return grpc.aio.secure_channel(address, tls, options=options + names, interceptors=interceptors)


def blocking_channel(address: str, *, credentials: Credentials | None = None) -> grpc.Channel:
    """A blocking channel to host:port with the same credentials and TLS rules as channel()."""
    creds = local_credentials(address) if credentials is None else credentials
    if creds.pin:
        tls, names = _secure_options(address, creds.pin)
        plain = grpc.secure_channel(address, tls, options=message_options() + names)
    else:
        plain = grpc.insecure_channel(address, options=message_options())
    metadata = creds.metadata()
    return grpc.intercept_channel(plain, *([_BlockingMetadata(metadata)] if metadata else []))


class _BlockingMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata to every unary call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def _details(self, details):
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self.metadata),
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression
