"""Emulated network links between the router and each expert: added RTT, jitter and loss.

Three backends, best first:

- ``netem``: one Linux network namespace per expert joined to the host by a veth pair, with a
  ``tc netem`` qdisc on the host side (delay = the whole added RTT, normal jitter, packet loss).
  Needs root, iproute2 and a kernel with sch_netem. Experts run as subprocesses inside the
  namespaces; only addresses inside namespaces this module creates are used.
- ``proxy``: a user-space TCP relay per expert on loopback, in its own thread. Every chunk read
  from a socket is delivered after rtt/2 (± jitter) in each direction, in order (TCP-like head-of-
  line blocking); a "lost" chunk is delivered one retransmission timeout later,
  RTO = max(200 ms, rtt + 4 × jitter) (Linux's minimum RTO). Also counts bytes on the wire.
- ``inproc``: the expert's own ``delay_ms`` (sleep before each Step reply). Fixed delay only:
  no jitter, no loss, nothing on control traffic; experts restart when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import shutil
import subprocess
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

BACKENDS = ("netem", "proxy", "inproc")
MIN_RTO_MS = 200.0


@dataclass(frozen=True, kw_only=True)
class LinkSpec:
    rtt_ms: float = 0.0  # round-trip time added between the router and this expert
    jitter_ms: float = 0.0  # standard deviation of the added round-trip time
    loss: float = 0.0  # probability that a packet (netem) or a forwarded chunk (proxy) is lost, 0..1

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.jitter_ms < 0 or not 0 <= self.loss < 1:
            raise ValueError(f"bad link {self}: rtt and jitter must be >= 0 and loss in [0, 1)")

    @property
    def rto_ms(self) -> float:
        """Retransmission timeout the proxy charges a lost chunk."""
        return max(MIN_RTO_MS, self.rtt_ms + 4 * self.jitter_ms)


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=20)


def netem_available() -> tuple[bool, str]:
    """Whether namespaces, veth pairs and a netem qdisc can be made here, and why not when they cannot."""
    if os.geteuid() != 0:
        return False, "not running as root"
    if not (shutil.which("ip") and shutil.which("tc")):
        return False, "iproute2 (ip, tc) not installed"
    ns, host, peer = f"mlprobe{os.getpid() % 100000}", f"mlph{os.getpid() % 10000}", f"mlpe{os.getpid() % 10000}"
    try:
        steps = [["ip", "netns", "add", ns], ["ip", "link", "add", host, "type", "veth", "peer", "name", peer],
                 ["tc", "qdisc", "add", "dev", host, "root", "netem", "delay", "1ms"]]
        for cmd in steps:
            done = _run(cmd, check=False)
            if done.returncode != 0:
                why = done.stderr.strip() or f"exit {done.returncode}"
                if cmd[0] == "tc":
                    why += " (the kernel lacks the sch_netem qdisc)"
                return False, f"`{' '.join(cmd)}` failed: {why}"
        return True, "network namespaces, veth and tc netem work"
    finally:
        _run(["ip", "link", "del", host], check=False)
        _run(["ip", "netns", "del", ns], check=False)


class NetemNetwork:
    """One namespace + veth pair per expert, links shaped by tc netem on the host side."""

    kind = "netem"

    def __init__(self, n: int, subnet: int = 213):
        tag = os.getpid() % 10000
        self.names = [f"mlab{tag}x{i}" for i in range(n)]
        self.host_dev = [f"mlh{tag}x{i}" for i in range(n)]
        self.ns_dev = [f"mle{tag}x{i}" for i in range(n)]
        self.host_ip = [f"10.{subnet}.{i}.1" for i in range(n)]
        self.ns_ip = [f"10.{subnet}.{i}.2" for i in range(n)]
        self.links = [LinkSpec() for _ in range(n)]
        self._made = 0
        try:
            for i in range(n):
                self._make(i)
        except Exception:
            self.close()
            raise

    def _make(self, i: int) -> None:
        ns, h, e = self.names[i], self.host_dev[i], self.ns_dev[i]
        _run(["ip", "netns", "add", ns])
        self._made = i + 1
        _run(["ip", "link", "add", h, "type", "veth", "peer", "name", e])
        _run(["ip", "link", "set", e, "netns", ns])
        _run(["ip", "addr", "add", f"{self.host_ip[i]}/24", "dev", h])
        _run(["ip", "link", "set", h, "up"])
        _run(["ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ns_ip[i]}/24", "dev", e])
        _run(["ip", "netns", "exec", ns, "ip", "link", "set", e, "up"])
        _run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])

    def wrap(self, i: int, argv: list[str]) -> list[str]:
        """The command line that runs argv inside expert i's namespace."""
        return ["ip", "netns", "exec", self.names[i], *argv]

    def set_link(self, i: int, spec: LinkSpec) -> None:
        """Shape expert i's link (replacing the qdisc; a zero spec removes it)."""
        dev = self.host_dev[i]
        if spec == LinkSpec():
            _run(["tc", "qdisc", "del", "dev", dev, "root"], check=False)
        else:
            cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{spec.rtt_ms}ms"]
            if spec.jitter_ms:
                cmd += [f"{spec.jitter_ms}ms", "distribution", "normal"]
            if spec.loss:
                cmd += ["loss", f"{spec.loss * 100}%"]
            _run(cmd)
        self.links[i] = spec

    def close(self) -> None:
        """Delete the veth pairs and namespaces this object made."""
        for i in range(self._made):
            _run(["ip", "link", "del", self.host_dev[i]], check=False)
            _run(["ip", "netns", "del", self.names[i]], check=False)
        self._made = 0


class DelayProxy:
    """User-space TCP relays on loopback, one per expert, adding delay, jitter and loss-as-retransmission."""

    kind = "proxy"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delay-proxy", daemon=True)
        self._thread.start()
        self.links: list[LinkSpec] = []
        self.targets: list[str | None] = []
        self.ports: list[int] = []
        self.wire_bytes: list[list[int]] = []  # per relay: [router->expert, expert->router]
        self.lost_chunks: list[int] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._conns: set[asyncio.Task] = set()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def add(self, target: str | None = None) -> str:
        """Open a relay (target may be set later); returns the loopback address to dial."""
        i = len(self.links)
        self.links.append(LinkSpec())
        self.targets.append(target)
        self.wire_bytes.append([0, 0])
        self.lost_chunks.append(0)

        async def start():
            return await asyncio.start_server(lambda r, w: self._accept(i, r, w), "127.0.0.1", 0)

        server = self._call(start())
        self._servers.append(server)
        self.ports.append(server.sockets[0].getsockname()[1])
        return f"127.0.0.1:{self.ports[i]}"

    def set_target(self, i: int, address: str) -> None:
        """Point relay i at the expert's real host:port."""
        self.targets[i] = address

    def set_link(self, i: int, spec: LinkSpec) -> None:
        """Change relay i's link; applies to chunks read from now on."""
        self.links[i] = spec

    def _accept(self, i: int, reader, writer) -> None:
        task = self._loop.create_task(self._relay(i, reader, writer))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def _relay(self, i: int, reader, writer) -> None:
        target = self.targets[i]
        if target is None:
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(i, 0, reader, up_writer), self._pipe(i, 1, up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                w.close()

    def _one_way_ms(self, i: int) -> float:
        spec = self.links[i]
        delay = spec.rtt_ms / 2
        if spec.jitter_ms:
            delay = max(0.0, self._rng.gauss(delay, spec.jitter_ms / math.sqrt(2)))
        if spec.loss and self._rng.random() < spec.loss:
            self.lost_chunks[i] += 1
            delay += spec.rto_ms
        return delay

    async def _pipe(self, i: int, direction: int, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver():
            while True:
                at, data = await queue.get()
                if data is None:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = loop.create_task(deliver())
        last = 0.0
        try:
            while data := await reader.read(1 << 16):
                self.wire_bytes[i][direction] += len(data)
                last = max(loop.time() + self._one_way_ms(i) / 1000, last)  # TCP delivers in order
                queue.put_nowait((last, data))
            queue.put_nowait((last, None))
            await sender
        finally:
            if not sender.done():
                sender.cancel()

    def close(self) -> None:
        """Close every relay and stop the thread."""
        async def shutdown():
            for server in self._servers:
                server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def choose_backend(wanted: str, launch: str) -> tuple[str, str]:
    """The backend to use for `wanted` (auto or a name) and the reason; netem needs subprocess experts."""
    if wanted not in ("auto", *BACKENDS):
        raise ValueError(f"unknown network backend {wanted!r}; use auto, {', '.join(BACKENDS)}")
    if wanted in ("auto", "netem"):
        ok, why = netem_available()
        if ok and launch != "subprocess":
            ok, why = False, "netem needs experts as subprocesses inside namespaces (--launch subprocess)"
        if ok:
            return "netem", why
        if wanted == "netem":
            raise RuntimeError(f"netem backend unavailable: {why}")
        return "proxy", f"netem unavailable ({why}); using the user-space delay proxy"
    reason = {"proxy": "user-space delay proxy (asked for)", "inproc": "in-process Step delay (asked for)"}
    return wanted, reason[wanted]
