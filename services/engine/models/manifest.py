"""A variant directory's checksum: one SHA-256 over every file's name and bytes.

The optimizer writes ``tokenline-variant.json`` (recipe, source, checksum) as the
last file of a variant; the loader recomputes the checksum before it serves the
directory, so a file changed or truncated after publishing is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from services.errors import InvalidParameterError

MANIFEST_FILE = "tokenline-variant.json"
_CHUNK = 1 << 20


def directory_checksum(directory: Path) -> str:
    """SHA-256 over the sorted (relative name, content) of every file but the manifest."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    content = json.loads(path.read_text())
    if not isinstance(content, dict) or not isinstance(content.get("checksum"), str):
        raise InvalidParameterError("model_dir", str(path), "manifest has no checksum")
    return content


def verify_manifest(directory: Path, expected: str | None = None) -> None:
    """Raise when the directory no longer matches its manifest (or the registry's ``expected``)."""
    manifest = read_manifest(directory)
    if manifest is None:
        if expected is not None:
            raise InvalidParameterError(
                "model_dir", str(directory), f"no {MANIFEST_FILE}: not a published variant"
            )
        return
    actual = directory_checksum(directory)
    for name, wanted in (("manifest", manifest["checksum"]), ("registry", expected)):
        if wanted is not None and actual != wanted:
            raise InvalidParameterError(
                "model_dir",
                str(directory),
                f"variant checksum mismatch: files hash to {actual[:16]}..., {name} says {wanted[:16]}... "
                "(changed after publishing; re-run `tokenline optimize --publish`)",
            )
