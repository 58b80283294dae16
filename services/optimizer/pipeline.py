"""One optimizer run: load -> calibrate -> quantize -> evaluate -> write -> publish.

Plain Python (the actor wraps it). Nothing is half-published: the variant is built
in a staging directory next to its final place, checked by the gate, given its
manifest, fsynced and renamed into place; only then is the registry entry written.
A failure or a cancellation at any point removes the staging directory, and a run
killed outright leaves only a ``.staging-*`` directory, which the next run sweeps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.engine.models.manifest import MANIFEST_FILE, directory_checksum
from services.errors import InvalidParameterError, TokenlineError
from services.optimizer.calibration import calibrate
from services.optimizer.config import OptimizerConfig
from services.optimizer.gate import GateReport, run_gate
from services.optimizer.heldout import demo_sequences, text_sequences
from services.optimizer.recipes import get_recipe
from services.optimizer.writer import quantize_checkpoint, write_variant
from services.queue.registry import VariantEntry, VariantRegistry, variant_name

logger = logging.getLogger(__name__)

# Calibration comes before quantization: a calibrated recipe (GPTQ) chooses codes from it.
STAGES = ("load", "calibrate", "quantize", "evaluate", "write", "publish")
Progress = Callable[[str, float, str], None]  # (stage, fraction done, detail)


class OptimizeCancelled(TokenlineError):
    def __init__(self, stage: str) -> None:
        self._init_args = (stage,)
        self.stage = stage
        super().__init__(f"optimize cancelled during {stage}; nothing was published")


@dataclass(frozen=True)
class OptimizeRequest:
    model: str  # 'demo' or a checkpoint directory
    recipe: str
    publish: bool = False
    redis_url: str = ""
    key_prefix: str = "tl"


@dataclass(frozen=True)
class OptimizeResult:
    variant: str
    passed: bool
    published: bool
    variant_dir: str  # '' when the gate refused the variant
    checksum: str
    report: dict[str, Any]
    table: str
    stage_seconds: dict[str, float] = field(default_factory=dict)


def optimize(
    request: OptimizeRequest,
    config: OptimizerConfig,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> OptimizeResult:
    say: Progress = progress or (lambda stage, fraction, detail: None)
    recipe = get_recipe(request.recipe)
    thresholds = config.gates.get(recipe.name)
    if thresholds is None:
        raise InvalidParameterError("recipe", recipe.name, "has no gate thresholds in OptimizerConfig.gates")
    if request.publish and not request.redis_url:
        raise InvalidParameterError("redis_url", "", "--publish needs the Redis that holds the registry")
    timings: dict[str, float] = {}

    def stage(name: str) -> float:
        if cancelled():
            raise OptimizeCancelled(name)
        say(name, 0.0, "")
        return time.monotonic()

    started = stage("load")
    source, model_name, is_demo = resolve_source(request.model)
    source_hash = weights_sha256(source)
    name = variant_name(model_name, recipe.name)
    root = config.variants_path()
    root.mkdir(parents=True, exist_ok=True)
    _sweep_dead_staging(root)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=root))
    timings["load"] = time.monotonic() - started
    say("load", 1.0, f"{source} (weights sha256 {source_hash[:12]})")
    try:
        started = stage("calibrate")
        hessians = calibrate(source, recipe, config, lambda done, detail: say("calibrate", done, detail))
        timings["calibrate"] = time.monotonic() - started

        started = stage("quantize")
        quantized = quantize_checkpoint(
            source,
            recipe,
            lambda done, total: say("quantize", done / total, f"{done}/{total} tensors"),
            hessians,
        )
        del hessians
        write_variant(source, quantized, recipe, staging)
        del quantized
        timings["quantize"] = time.monotonic() - started
        say("quantize", 1.0, recipe.description)

        started = stage("evaluate")
        sequences = (
            demo_sequences(source)
            if is_demo
            else text_sequences(
                source,
                Path(config.heldout_text) if config.heldout_text else None,
                config.heldout_max_tokens,
                config.heldout_window,
            )
        )
        report = run_gate(
            recipe.name, source, staging, sequences, thresholds, config.demo_examples if is_demo else None
        )
        timings["evaluate"] = time.monotonic() - started
        say(
            "evaluate", 1.0, "passed" if report.passed else f"FAILED: {report.failed_figures or report.error}"
        )
        if not report.passed:
            return _result(name, report, timings)

        started = stage("write")
        checksum = _seal(staging, name, recipe.name, model_name, source_hash, report)
        if cancelled():
            raise OptimizeCancelled("write")
        final = root / name
        _install(staging, final)
        timings["write"] = time.monotonic() - started
        say("write", 1.0, str(final))

        published = False
        if request.publish:
            started = stage("publish")
            entry = VariantEntry(
                name=name,
                source_model=model_name,
                source_weights_sha256=source_hash,
                recipe=recipe.name,
                gate=report.figures,
                artifact_dir=str(final),
                checksum=checksum,
                created_at=time.time(),
            )
            with VariantRegistry(request.redis_url, request.key_prefix) as registry:
                registry.publish(entry)
            published = True
            timings["publish"] = time.monotonic() - started
            say("publish", 1.0, f"{name} in the registry")
        return _result(name, report, timings, final, checksum, published)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_source(model: str) -> tuple[Path, str, bool]:
    """(checkpoint directory, model name, whether it is the demo model)."""
    from services.demo import build_demo_model, read_metadata

    if model == "demo":
        path = build_demo_model()
    else:
        path = Path(model).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise InvalidParameterError("model", model, "neither 'demo' nor a checkpoint directory")
    metadata = read_metadata(path) or {}
    is_demo = metadata.get("format") == "tokenline-demo-model"
    return path, "demo" if model == "demo" else path.name, is_demo


def weights_sha256(source: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(source.glob("*.safetensors")):
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _seal(staging: Path, name: str, recipe: str, source: str, source_hash: str, report: GateReport) -> str:
    """Write the manifest and fsync every file and the directory; return the checksum."""
    checksum = directory_checksum(staging)
    manifest = {
        "variant": name,
        "recipe": recipe,
        "source_model": source,
        "source_weights_sha256": source_hash,
        "checksum": checksum,
        "gate": report.to_dict(),
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    for path in staging.iterdir():
        _fsync(path)
    _fsync(staging)
    return checksum


def _install(staging: Path, final: Path) -> None:
    """Rename into place (replacing an older variant of the same name), then fsync the parent."""
    if final.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".retired-{final.name}-", dir=final.parent))
        os.rename(final, retired / final.name)
        os.rename(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, final)
    _fsync(final.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep_dead_staging(root: Path, older_than_s: float = 3600.0) -> None:
    # A staging directory this old belongs to a run that was killed (runs take minutes).
    now = time.time()
    for leftover in [*root.glob(".staging-*"), *root.glob(".retired-*")]:
        if now - leftover.stat().st_mtime > older_than_s:
            shutil.rmtree(leftover, ignore_errors=True)


def _result(
    name: str,
    report: GateReport,
    timings: dict[str, float],
    final: Path | None = None,
    checksum: str = "",
    published: bool = False,
) -> OptimizeResult:
    return OptimizeResult(
        variant=name,
        passed=report.passed,
        published=published,
        variant_dir=str(final or ""),
        checksum=checksum,
        report=report.to_dict(),
        table=report.table(),
        stage_seconds=timings,
    )
