"""Throwaway local ``redis-server`` processes for tests, demos and benchmarks.

kvcellar never starts Redis in production (the operator runs it); but its tests, the
prefill/decode demo and the tier benchmark need a real server or a real 3-master cluster that
they own: started on free loopback ports in a temporary directory, with persistence off, and
always stopped. Nothing here is needed to *use* a Redis tier.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvcellar.errors import KvcellarError


class RedisUnavailable(KvcellarError):
    """redis-server is not installed here (install the Debian package redis-server)."""


def redis_available() -> bool:
    return shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) exists and is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 <= 65535 and _port_free(port + 10000):
            return port
    raise RedisUnavailable("found no free port pair for a Redis Cluster node")


def _wait_ping(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False
        )
        if out.stdout.strip() == "PONG":
            return
        time.sleep(0.05)
    raise RedisUnavailable(f"redis-server on port {port} did not answer PING in {timeout_s} s")


@dataclass
class RedisServer:
    """One redis-server process; ``url`` to connect, ``kill``/``start``/``pause`` for faults."""

    port: int
    workdir: Path
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if not redis_available():
            raise RedisUnavailable("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ping(self.port)
        return self

    def kill(self) -> None:
        """Stop the server abruptly (SIGKILL): what a crash looks like to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing answers (slow Redis)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class RedisCluster:
    """A Redis Cluster of ``len(nodes)`` masters and no replicas."""

    nodes: list[RedisServer]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def start_redis(workdir: Path | None = None, extra: list[str] | None = None,
                port: int | None = None) -> RedisServer:
    root = workdir or Path(tempfile.mkdtemp(prefix="kvcellar-redis-"))
    return RedisServer(port or free_port(), root, list(extra or [])).start()


def start_cluster(workdir: Path | None = None, masters: int = 3) -> RedisCluster:
    """Start ``masters`` cluster-enabled servers and join them with ``redis-cli --cluster create``."""
    root = workdir or Path(tempfile.mkdtemp(prefix="kvcellar-cluster-"))
    nodes: list[RedisServer] = []
    try:
        for i in range(masters):
            port = free_cluster_port()
            nodes.append(
                RedisServer(
                    port,
                    root / f"node{i}",
                    ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"],
                ).start()
            )
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if create.returncode != 0:
            raise RedisUnavailable(f"redis-cli --cluster create failed: {create.stdout[-500:]}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [
                subprocess.run(
                    ["redis-cli", "-p", str(n.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout
                for n in nodes
            ]
            if all("cluster_state:ok" in s for s in states):
                return RedisCluster(nodes)
            time.sleep(0.1)
        raise RedisUnavailable("the Redis Cluster did not reach cluster_state:ok in 30 s")
    except BaseException:
        for n in nodes:
            with contextlib.suppress(Exception):
                n.stop()
        raise
