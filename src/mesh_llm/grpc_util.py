"""Shared gRPC plumbing: servers with health checking and reflection, channels with sane limits."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mesh_llm.errors import MeshError

DEFAULT_MAX_MESSAGE = 4 << 20


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> list[tuple[str, int]]:
    """Channel/server options bounding message sizes both ways."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)]


def new_server(max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> grpc.aio.Server:
    """An asyncio gRPC server with bounded message sizes."""
    return grpc.aio.server(options=message_options(max_message_bytes) + [("grpc.so_reuseport", 0)])


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


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Listen on host:port (0 picks a free port) without TLS; returns the port bound."""
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise MeshError(f"could not listen on {address} ({exc}); is the port in use? pick another with --port") from None
    if bound == 0:
        raise MeshError(f"could not listen on {address}; is the port in use? pick another with --port")
    return bound


def channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE) -> grpc.aio.Channel:
    """An insecure asyncio channel to host:port with bounded message sizes."""
    return grpc.aio.insecure_channel(address, options=message_options(max_message_bytes))
