"""Deployment configs: cluster/serve-config.yaml, cluster/ray-cluster.yaml,
cluster/redis.conf and the Helm chart in helm/tokenline.

Fast checks only (no Ray cluster, no Kubernetes): each config is validated by the
code that will consume it (Ray Serve's config schema and builder call, AppConfig,
the Ray cluster launcher's validator, a real redis-server), and the chart's
templates are checked against values.yaml. tests/test_helm_chart.py lints and renders
the chart with a real helm.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from services.config import AppConfig, EngineAutoscaling
from services.queue.redis_server import find_redis_server
from services.server import RAY_GRPC_MAX_MESSAGE_ENV
from tests.serving_stack import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "cluster" / "serve-config.yaml"
RAY_CLUSTER = ROOT / "cluster" / "ray-cluster.yaml"
REDIS_CONF = ROOT / "cluster" / "redis.conf"
CHART = ROOT / "helm" / "tokenline"
TEMPLATES = CHART / "templates"
FRONTEND_DEPLOYMENTS = ("ingress", "tokenizer", "detokenizer")
# Fields of AppConfig that the chart computes instead of taking from serve.app.
CHART_FILLED_ARGS = {"app_name", "grpc_port", "redis_url"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def serve_application() -> dict[str, Any]:
    config = load_yaml(SERVE_CONFIG)
    (application,) = config["applications"]
    return application


def pyproject_dependencies() -> list[str]:
    """The quoted entries of [project].dependencies in pyproject.toml (no tomllib on 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"(?ms)^dependencies = \[(.*?)^\]", text)
    assert block, "pyproject.toml has no [project] dependencies list"
    return re.findall(r'"([^"]+)"', block.group(1))


def torch_pin() -> str:
    """The torch version pyproject.toml pins (`torch==X`)."""
    dependencies = pyproject_dependencies()
    pins = [dep.split("==", 1)[1].strip() for dep in dependencies if re.match(r"torch\s*==", dep)]
    assert len(pins) == 1, f"pyproject.toml should pin torch exactly once: {dependencies}"
    return pins[0]


def built_deployments(args: dict[str, Any], import_path: str) -> dict[str, Any]:
    """Build the application exactly as `serve deploy` does and return its deployments by name.

    Models with ``path: null`` would make build_app build the demo checkpoint; a
    placeholder directory stands in (building an Application opens no files).
    """
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve._private.utils import import_attr

    args = copy.deepcopy(args)
    for model in args["models"]:
        model["path"] = model["path"] or "/nonexistent/checkpoint"
    builder = import_attr(import_path)
    application = call_user_app_builder_with_args_if_necessary(builder, args)
    built = build_serve_app(application, name=args.get("app_name", "tokenline"))
    return {deployment.name: deployment for deployment in built.deployments}


# --------------------------------------------------------------------------- serve config


def test_serve_config_is_a_valid_serve_deploy_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    from services.app import GRPC_SERVICER_FUNCTIONS

    raw = load_yaml(SERVE_CONFIG)
    schema = ServeDeploySchema.model_validate(raw)
    (application,) = schema.applications
    args = application.args

    assert application.name == "tokenline" == args["app_name"]
    assert application.import_path == "services.app:build_app"
    # Serve registers an application with its proxies (gRPC included) only when it has
    # a route prefix; with None the gRPC proxy answers NOT_FOUND for every call.
    assert application.route_prefix is not None
    assert schema.grpc_options.port == args["grpc_port"] == 50051
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS


def test_serve_config_args_validate_as_app_config() -> None:
    args = serve_application()["args"]
    config = AppConfig.model_validate(args)

    assert config.redis_url.startswith("redis://")
    assert "127.0.0.1" not in config.redis_url and "localhost" not in config.redis_url, (
        "every Ray node must reach Redis: a loopback URL only works on one machine"
    )
    demo = config.model("demo")
    assert demo is not None and demo.path is None
    assert config.default_model_name == "demo"


def test_serve_config_args_are_rejected_when_wrong() -> None:
    """The validation above has teeth: a misspelled key or a bad value is refused."""
    args = serve_application()["args"]
    with pytest.raises(ValueError, match="queue_depth"):
        AppConfig.model_validate({**args, "queue_depth": 5})
    broken_models = copy.deepcopy(args["models"])
    broken_models[0]["engine"]["dtype"] = "float8"
    with pytest.raises(ValueError, match="dtype"):
        AppConfig.model_validate({**args, "models": broken_models})


def test_builder_receives_the_args_dict_and_builds_every_overridden_deployment() -> None:
    from ray.serve.schema import ServeApplicationSchema

    from services.app import build_app

    application = serve_application()
    # Serve converts args into the builder's parameter type only when that annotation
    # is a pydantic class; build_app's is `AppConfig | dict`, so it gets the dict and
    # validates it itself.
    (parameter,) = inspect.signature(build_app).parameters.values()
    assert not (inspect.isclass(parameter.annotation) and issubclass(parameter.annotation, AppConfig))

    deployments = built_deployments(application["args"], application["import_path"])
    overrides = ServeApplicationSchema.model_validate(application).deployments
    assert {d.name for d in overrides} == set(FRONTEND_DEPLOYMENTS)
    assert {d.name for d in overrides} <= set(deployments), (
        f"overrides {[d.name for d in overrides]} must name built deployments {sorted(deployments)}"
    )
    for model in application["args"]["models"]:
        engine = deployments[f"engine-{model['name']}"]
        assert engine.num_replicas == model["engine_replicas"]
        assert engine.ray_actor_options["num_gpus"] == model["engine_num_gpus"]


def test_grpc_servicer_functions_import() -> None:
    from ray.serve._private.utils import import_attr

    functions = load_yaml(SERVE_CONFIG)["grpc_options"]["grpc_servicer_functions"]
    assert len(functions) == 2, "the Generation service and grpc.health.v1.Health"
    for function in functions:
        add_servicer = import_attr(function)
        assert callable(add_servicer)
        assert list(inspect.signature(add_servicer).parameters) == ["servicer", "server"]


# --------------------------------------------------------------------------- redis.conf


def redis_directives(text: str) -> dict[str, str]:
    """Directive -> its arguments (as written) of a redis.conf text, comments skipped."""
    directives: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        assert name.lower() not in directives, f"{name} is set twice"
        directives[name.lower()] = value.strip()
    return directives


def test_redis_conf_has_the_durability_settings() -> None:
    directives = redis_directives(REDIS_CONF.read_text())

    assert directives["appendonly"] == "yes"
    assert directives["appendfsync"] == "always"
    assert directives["no-appendfsync-on-rewrite"] == "no"
    assert directives["save"] == '""', "no RDB snapshots"
    assert directives["maxmemory-policy"] == "noeviction"
    assert re.fullmatch(r"\d+(gb|mb)", directives["maxmemory"]), "a finite maxmemory"
    assert directives["protected-mode"] in ("yes", "no") and "bind" in directives


def start_redis(command: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            pytest.fail(f"redis-server rejected {REDIS_CONF.name}:\n{output}")
        try:
            if client.ping():
                return process
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            time.sleep(0.05)
    process.kill()
    pytest.fail("redis-server did not come up")


def test_redis_conf_is_accepted_by_redis_server_and_persists_writes(tmp_path: Path) -> None:
    """Start a real redis-server on this very file, crash it, and see an acknowledged write survive."""
    conf = tmp_path / "redis.conf"
    conf.write_text(re.sub(r"(?m)^dir .*$", f"dir {tmp_path}", REDIS_CONF.read_text()))
    port = free_port()
    # Options after the file override it: loopback only, on a free port.
    command = [str(find_redis_server()), str(conf), "--port", str(port), "--bind", "127.0.0.1"]

    process = start_redis(command, port)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        keys = ("appendonly", "appendfsync", "save", "maxmemory-policy", "maxmemory")
        settings = {key: client.config_get(key)[key] for key in keys}
        assert settings["appendonly"] == "yes"
        assert settings["appendfsync"] == "always"
        assert settings["save"] == ""
        assert settings["maxmemory-policy"] == "noeviction"
        assert int(settings["maxmemory"]) > 0

        client.xadd("tl:test:stream", {"request": "accepted"})
        process.send_signal(signal.SIGKILL)  # a crash: no shutdown work happens
        process.wait(timeout=10)
        process = start_redis(command, port)
        assert redis.Redis(host="127.0.0.1", port=port).xlen("tl:test:stream") == 1
    finally:
        process.kill()
        process.wait(timeout=10)


# --------------------------------------------------------------------------- ray cluster launcher


def test_ray_cluster_config_passes_the_launcher_validation() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(RAY_CLUSTER)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs


def test_ray_cluster_has_cpu_head_and_gpu_workers_with_pinned_torch() -> None:
    config = load_yaml(RAY_CLUSTER)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"]["CPU"] == 0, "the head advertises no CPU: replicas go to workers"

    gpu_types = [name for name, spec in types.items() if spec["resources"].get("GPU", 0) >= 1]
    cpu_types = [
        name for name, spec in types.items() if name != config["head_node_type"] and name not in gpu_types
    ]
    assert gpu_types and cpu_types

    pin = torch_pin()
    cpu_wheel = f"torch=={pin} --index-url https://download.pytorch.org/whl/cpu"
    # Head and CPU workers run the global setup_commands: the CPU build.
    for name in [config["head_node_type"], *cpu_types]:
        assert "worker_setup_commands" not in types[name], f"{name} must use the global setup_commands"
    assert any(cpu_wheel in command for command in config["setup_commands"])
    # GPU workers replace them with the CUDA build (plain PyPI wheel) of the same version.
    for name in gpu_types:
        commands = types[name]["worker_setup_commands"]
        torch_installs = [c for c in commands if re.search(r"\btorch==", c)]
        assert torch_installs == [c for c in torch_installs if f"torch=={pin}" in c and "whl/cpu" not in c]
        assert torch_installs, f"{name} installs no torch"
        assert any("-e ~/tokenline" in c for c in commands)

    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_ray_cluster_pins_a_ray_version_that_pyproject_allows() -> None:
    from packaging.requirements import Requirement

    config = load_yaml(RAY_CLUSTER)
    commands = [*config["setup_commands"]]
    for spec in config["available_node_types"].values():
        commands += spec.get("worker_setup_commands", [])
    versions = set(re.findall(r"ray\[serve\]==([0-9][^'\" ]*)", " ".join(commands)))
    assert len(versions) == 1, f"every node must run the same Ray: {versions}"
    (ray_requirement,) = [Requirement(d) for d in pyproject_dependencies() if d.startswith("ray")]
    assert ray_requirement.specifier.contains(versions.pop())


def default_grpc_max_message_bytes() -> int:
    default: int = AppConfig.model_fields["grpc_max_message_bytes"].default
    return default


def test_ray_cluster_sets_the_grpc_message_limit_that_serve_config_uses() -> None:
    """Ray Serve's gRPC proxy takes its message limit from the environment of the Ray
    processes only; every `ray start` (a proxy runs on every node) sets it to the value
    the application is configured with, which is AppConfig's default."""
    config = load_yaml(RAY_CLUSTER)
    configured = serve_application()["args"]["grpc_max_message_bytes"]
    assert configured == default_grpc_max_message_bytes()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [command for command in config[key] if "ray start" in command]
        values = re.findall(rf"\b{RAY_GRPC_MAX_MESSAGE_ENV}=(\d+)", start)
        assert values == [str(configured)], (
            f"{key}: the ray start command must export {RAY_GRPC_MAX_MESSAGE_ENV}"
        )
        assert start.index(RAY_GRPC_MAX_MESSAGE_ENV) < start.index("ray start"), (
            f"{key}: set before ray start"
        )


# --------------------------------------------------------------------------- helm chart


def chart_values() -> dict[str, Any]:
    values = load_yaml(CHART / "values.yaml")
    assert isinstance(values, dict)
    return values


def template_texts() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(TEMPLATES.iterdir()) if path.is_file()}


def test_chart_metadata() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "tokenline"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    expected = {"_helpers.tpl", "NOTES.txt", "rayservice.yaml", "redis.yaml", "service.yaml"}
    assert expected <= set(template_texts())


def test_templates_reference_only_values_that_exist() -> None:
    values = chart_values()
    missing = []
    for name, text in template_texts().items():
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text):
            node: Any = values
            for key in match.group(1).strip(".").split("."):
                if not isinstance(node, dict) or key not in node:
                    missing.append(f"{name}: .Values{match.group(1)}")
                    break
                node = node[key]
    assert not missing, f"templates reference values that values.yaml lacks: {missing}"


def test_template_blocks_and_includes_are_consistent() -> None:
    texts = template_texts()
    defined: set[str] = set()
    for name, text in texts.items():
        actions = re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", text, flags=re.S)
        depth = 0
        for action in actions:
            if action.startswith("/*"):
                continue
            keyword = action.split(None, 1)[0] if action else ""
            if keyword in ("if", "range", "with", "define", "block"):
                depth += 1
            elif keyword == "end":
                depth -= 1
                assert depth >= 0, f"{name}: `end` without an opening block"
        assert depth == 0, f"{name}: {depth} block(s) not closed"
        defined |= set(re.findall(r'\{\{-?\s*define\s+"([^"]+)"', text))
    used = {
        used_name
        for text in texts.values()
        for used_name in re.findall(r'(?:include|template)\s+"([^"]+)"', text)
    }
    assert used <= defined, f"included but never defined: {sorted(used - defined)}"


def test_chart_serve_args_validate_as_app_config_and_build() -> None:
    values = chart_values()
    app_args = values["serve"]["app"]
    assert not CHART_FILLED_ARGS & set(app_args), f"the chart sets {sorted(CHART_FILLED_ARGS)} itself"
    args = {
        **app_args,
        "app_name": values["serve"]["appName"],
        "grpc_port": values["grpc"]["port"],
        "redis_url": "redis://tokenline-redis.ns.svc.cluster.local:6379/0",
    }
    config = AppConfig.model_validate(args)

    assert set(values["serve"]["frontend"]) == set(FRONTEND_DEPLOYMENTS)
    deployments = built_deployments(args, "services.app:build_app")
    assert set(FRONTEND_DEPLOYMENTS) <= set(deployments)
    gpus_needed = sum(m.most_engine_replicas * m.engine_num_gpus for m in config.models)
    gpus_there = values["gpuWorkers"]["replicas"] * values["gpuWorkers"]["gpusPerPod"]
    assert gpus_there >= gpus_needed, "the GPU worker group cannot hold every engine replica"


def helm_merge(base: Any, override: Any) -> Any:
    """Helm's merge of values files: maps key by key, everything else (lists too) replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {key: helm_merge(base.get(key), value) for key, value in override.items()} | {
            key: value for key, value in base.items() if key not in override
        }
    return override


def test_chart_defaults_are_the_tested_cpu_path() -> None:
    """values.yaml runs engines as the tests do (CPU, float32); GPU settings live apart."""
    values = chart_values()
    config = AppConfig.model_validate({**values["serve"]["app"], "redis_url": "redis://r:6379/0"})
    for model in config.models:
        assert (model.engine.device, model.engine.dtype, model.engine_num_gpus) == ("cpu", "float32", 0)
    assert values["gpuWorkers"]["replicas"] == 0


def test_chart_gpu_values_validate_and_fit_the_gpu_group() -> None:
    values = helm_merge(chart_values(), load_yaml(CHART / "values-gpu.yaml"))
    args = {
        **values["serve"]["app"],
        "app_name": "tokenline",
        "grpc_port": 50051,
        "redis_url": "redis://r:6379/0",
    }
    config = AppConfig.model_validate(args)
    assert all(m.engine.device.startswith("cuda") and m.engine_num_gpus >= 1 for m in config.models)
    gpus_needed = sum(m.most_engine_replicas * m.engine_num_gpus for m in config.models)
    assert values["gpuWorkers"]["replicas"] * values["gpuWorkers"]["gpusPerPod"] >= gpus_needed
    built_deployments(args, "services.app:build_app")


def test_configs_list_every_engine_autoscaling_knob_with_its_default() -> None:
    """The Serve config and the chart document engine autoscaling by listing its knobs: they
    stay in step with EngineAutoscaling (services/config.py), off by default."""
    defaults = EngineAutoscaling().model_dump()
    assert defaults["enabled"] is False
    for source, models in (
        ("cluster/serve-config.yaml", serve_application()["args"]["models"]),
        ("helm values.yaml", chart_values()["serve"]["app"]["models"]),
    ):
        for model in models:
            assert model["engine_autoscaling"] == defaults, f"{source}: model {model['name']}"


def test_serve_config_defaults_are_the_tested_cpu_path() -> None:
    config = AppConfig.model_validate(serve_application()["args"])
    for model in config.models:
        assert (model.engine.device, model.engine.dtype, model.engine_num_gpus) == ("cpu", "float32", 0)


def test_chart_sets_the_grpc_message_limit_on_every_ray_container() -> None:
    """Every Ray container (head and both worker groups) gets the shared container settings,
    whose env sets the proxy's limit from serve.app.grpc_max_message_bytes, whose value is
    AppConfig's default."""
    texts = template_texts()
    rayservice = texts["rayservice.yaml"]
    ray_containers = re.findall(
        r"- name: (ray-head|ray-worker)\n\s+\{\{- include \"tokenline.rayContainerCommon\"", rayservice
    )
    assert ray_containers == ["ray-head", "ray-worker"], "each Ray container must include rayContainerCommon"
    common = re.search(
        r'define "tokenline.rayContainerCommon" -\}\}\n(.*?)\{\{- end -\}\}', texts["_helpers.tpl"], re.S
    )
    assert common, "_helpers.tpl must define tokenline.rayContainerCommon"
    env_entry = re.search(
        rf"- name: {RAY_GRPC_MAX_MESSAGE_ENV}\n\s+value: \{{\{{ \.Values\.serve\.app\.grpc_max_message_bytes"
        r" \| default (\d+) \| int \| quote \}\}",
        common.group(1),
    )
    assert env_entry, (
        f"rayContainerCommon must set {RAY_GRPC_MAX_MESSAGE_ENV} from serve.app.grpc_max_message_bytes"
    )
    assert int(env_entry.group(1)) == default_grpc_max_message_bytes(), (
        "the fallback must be AppConfig's default"
    )
    assert chart_values()["serve"]["app"]["grpc_max_message_bytes"] == default_grpc_max_message_bytes()


def test_chart_redis_conf_matches_cluster_redis_conf() -> None:
    """templates/redis.yaml renders the settings of cluster/redis.conf; values fill the templated ones."""
    text = template_texts()["redis.yaml"]
    body = re.search(r'define "tokenline.redisConf" -\}\}\n(.*?)\{\{- end -\}\}', text, flags=re.S)
    assert body, "redis.yaml must define tokenline.redisConf"
    chart_conf = redis_directives(body.group(1))
    cluster_conf = redis_directives(REDIS_CONF.read_text())
    assert set(chart_conf) == set(cluster_conf)

    redis_values = chart_values()["redis"]
    from_values = {
        "port": str(redis_values["port"]),
        "appendfsync": redis_values["appendfsync"],
        "maxmemory": redis_values["maxmemory"],
    }
    for directive, value in chart_conf.items():
        if "{{" in value:
            assert directive in from_values, f"{directive} is templated from an unexpected value"
            value = from_values[directive]
        assert value == cluster_conf[directive], f"{directive}: chart {value!r} vs redis.conf"


def test_ray_cluster_sets_the_serve_environment_that_serve_config_asks_for() -> None:
    """Direct ingress behind HAProxy is switched on by the environment of the Ray processes:
    every `ray start` exports exactly what ``serve_environment`` derives from the app's args."""
    from services.server import serve_environment

    args = serve_application()["args"]
    wanted = serve_environment(AppConfig.model_validate(args))
    config = load_yaml(RAY_CLUSTER)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [command for command in config[key] if "ray start" in command]
        exported = dict(re.findall(r"\b([A-Z][A-Z0-9_]+)=(\S+?)[;\s]", start))
        for name, value in wanted.items():
            assert exported.get(name) == value, f"{key}: must export {name}={value}"
            assert start.index(name) < start.index("ray start"), f"{key}: set {name} before ray start"
