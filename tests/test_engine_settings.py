"""Engine settings: one default per knob, the backend choice, and `tokenline serve --backend`."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from services.cli_serving import add_serving_commands, app_config_from_args
from services.config import REPLICA_ONLY_SETTINGS, EngineSettings
from services.engine.backend import make_engine
from services.engine.config import EngineConfig
from services.errors import InvalidParameterError


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serving_commands(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_app_engine_defaults_are_the_engine_config_defaults() -> None:
    config_defaults = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    settings = EngineSettings()
    for name, value in settings.model_dump(exclude=REPLICA_ONLY_SETTINGS).items():
        assert value == config_defaults[name], name
    assert settings.engine_config("/m") == EngineConfig(model="/m")


def test_unknown_backend_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidParameterError, match=r"^backend="):
        EngineConfig(model="/m", backend="tgi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        EngineSettings(backend="tgi")  # type: ignore[arg-type]


def test_serve_backend_flag_picks_vllm_with_a_block_size_it_accepts() -> None:
    config = app_config_from_args(serve_args("--backend", "vllm"))
    (model,) = config.models
    assert (model.engine.backend, model.engine.block_size) == ("vllm", 32)
    assert config.default_model_name == model.name
    assert app_config_from_args(serve_args()).models[0].engine.backend == "native"


def test_vllm_backend_refuses_a_block_size_its_cpu_attention_cannot_use() -> None:
    """Checked before vLLM is imported: the error names the field whether or not it is installed."""
    with pytest.raises(InvalidParameterError, match=r"^block_size=16"):
        make_engine(EngineConfig(model="/m", backend="vllm", block_size=16))
