"""A real remix-serve subprocess on 127.0.0.1, for the server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemixServer:
    """`remix-serve --adapter CKPT` on a free port; waits for /health; SIGTERM on close.

    `adapter` is one checkpoint (a path), several (`[path or "NAME=path", ...]`: pool mode), or None (pool mode
    from flags in `extra` only, e.g. `--adapter-dir DIR`)."""

    def __init__(self, adapter: Path | str | list | None, *extra: str, log: Path, dtype: str = "float32"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        adapters = [] if adapter is None else adapter if isinstance(adapter, list) else [adapter]
        adapter_flags = [arg for a in adapters for arg in ("--adapter", str(a))]
        argv = [sys.executable, "-m", "remix_serve.server.cli", *adapter_flags, "--port", str(self.port),
                "--dtype", dtype, "--max-model-len", "512", "--kv-cache-memory-bytes", str(128 << 20),
                "--no-enable-prefix-caching", *extra]  # fmt: skip
        self.log = open(log, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ})

    def wait_ready(self, timeout: float = 240) -> RemixServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"remix-serve exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"remix-serve not healthy after {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def close(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
