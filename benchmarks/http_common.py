"""Shared pieces of the HTTP benchmarks: start a kvcellar server, time streamed requests.

Timing is client side, through the official ``openai`` client, as a user of the server sees it:
TTFT is the time from sending the request to the first content delta.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(cache: bool, **settings: object) -> Iterator[str]:
    """A ``kvcellar serve`` subprocess on a free loopback port; yields its base URL."""
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="kvcellar-http-bench-"))
    cfg = {"enabled": cache, "disk_bytes": 0, "disk_path": str(tmp / "kv"), **settings}
    (tmp / "server.yaml").write_text(yaml.safe_dump(cfg))
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvcellar",
            "serve",
            "--config",
            str(tmp / "server.yaml"),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become healthy in 300 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@dataclass
class Timed:
    ttft_s: float
    total_s: float
    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


def timed_chat(client, model: str, messages: list[dict], max_tokens: int) -> Timed:
    """One streamed greedy chat completion, timed from the client."""
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    total = time.perf_counter() - t0
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    return Timed(
        ttft_s=ttft if ttft is not None else total,
        total_s=total,
        text="".join(parts),
        prompt_tokens=usage.prompt_tokens if usage else 0,
        cached_tokens=(details.cached_tokens or 0) if details else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
    )


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
