"""The deployment files, checked offline with no Docker engine and no cluster: the compose file
against the Compose specification, the Dockerfiles with hadolint, deploy/k8s rendered by
kustomize (alone and with each optional component) against the Kubernetes schemas and KEDA's, the
Sentinel set's scripts and configs with the real redis-server, the systemd units with a small
parser (and systemd-analyze where it is installed); every T2I_* name they set is a setting, every
command they run is one our processes accept, and the numbers they repeat agree."""

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
from pydantic import BaseModel
from pydantic_settings import BaseSettings
from redis import Redis
from redis.connection import parse_url
from redis.exceptions import AuthenticationError, ResponseError

from shared.keyadmin import build_parser
from shared.probe import PROBES
from shared.settings import ApiSettings, CoreSettings, WorkerSettings, host_ports
from tests.support import REPO_ROOT, Process, free_port, port_open, setting_names, wait_until

BIN = Path(sys.executable).parent
SettingsT = TypeVar("SettingsT", bound=BaseSettings)
COMPOSE = REPO_ROOT / "docker-compose.yml"
K8S = REPO_ROOT / "deploy/k8s"
DOCKERFILES = {"txt2img-api": "Dockerfile.api", "txt2img-worker": "Dockerfile.worker"}
KUBERNETES_VERSIONS = ["1.30", "1.37"]
KEDA_MODELS: dict[str, type[BaseModel]] = {
    "ScaledObject": ScaledObject,
    "TriggerAuthentication": TriggerAuthentication,
}
# The processes our images run, and the health probe that belongs to each.
ENTRY_POINTS = {"api": "api", "worker": "worker", "worker.webhooks": "webhooks"}
# The default kustomization, then with each optional component (deploy/k8s/<name>).
VARIANTS: list[tuple[str, ...]] = [(), ("ingress",), ("sentinel",)]
# What each component adds.
COMPONENT_KINDS: dict[tuple[str, ...], set[str]] = {
    ("ingress",): {"Ingress"},
    ("sentinel",): {"StatefulSet", "ConfigMap", "NetworkPolicy"},
}


def tool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """A checker installed with the dev extra, run from the virtual environment's bin/."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


Docs = tuple[dict[str, Any], ...]


def kustomize(directory: Path) -> Docs:
    rendered = tool("kubectl", "kustomize", str(directory))
    assert rendered.returncode == 0, rendered.stderr
    return tuple(doc for doc in yaml.safe_load_all(rendered.stdout) if doc)


@cache
def manifests(*components: str) -> Docs:
    """deploy/k8s rendered; with components, as an overlay of one's own that lists them."""
    if not components:
        return kustomize(K8S)
    with tempfile.TemporaryDirectory() as overlay:
        # kustomize takes only relative paths to other kustomizations.
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(K8S, overlay)],
            "components": [os.path.relpath(K8S / name, overlay) for name in components],
        }
        (Path(overlay) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return kustomize(Path(overlay))


def manifest(kind: str, name: str, docs: Docs | None = None) -> dict[str, Any]:
    docs = manifests() if docs is None else docs
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def find(kind: str, name: str, docs: Docs) -> dict[str, Any] | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def dockerfile_instructions(path: str) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, continuation lines joined and comments dropped."""
    text = (REPO_ROOT / path).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in joined.splitlines()
        if (parts := line.strip().split(None, 1))
    ]


def dockerfile_env(path: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in dockerfile_instructions(path):
        if instruction == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(arguments))
    return env


def dockerfile_exec_form(path: str, instruction: str) -> list[str]:
    """CMD's argv, or HEALTHCHECK's command's argv."""
    (arguments,) = [args for name, args in dockerfile_instructions(path) if name == instruction]
    return json.loads(arguments[arguments.index("[") :])


def container_env(container: dict[str, Any], docs: Docs | None = None) -> dict[str, str]:
    """A Kubernetes container's environment: its ConfigMaps and Secrets (from `docs`, the
    default rendering unless given; an optional one that is not there adds nothing), then its
    own `env`."""
    docs = manifests() if docs is None else docs
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            kind, field, ref = "ConfigMap", "data", source["configMapRef"]
        else:
            kind, field, ref = "Secret", "stringData", source["secretRef"]
        found = find(kind, ref["name"], docs)
        assert found is not None or ref.get("optional"), ref
        env.update(found[field] if found else {})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = manifest("Secret", ref["name"], docs)["stringData"][ref["key"]]
    return env


def pod_containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return doc["spec"]["template"]["spec"]["containers"]


def our_containers(docs: Docs | None = None) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """(pod spec, container, Dockerfile) for every container running one of our images."""
    found = []
    for doc in manifests() if docs is None else docs:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            image = container["image"].rsplit("/", 1)[-1].split(":")[0]
            found.append((doc, container, DOCKERFILES[image]))
    return found


def pod_specs_by_module() -> dict[str, dict[str, Any]]:
    """The default rendering's pod spec for each of our processes, by the module it runs."""
    pods = {}
    for deployment, container, dockerfile in our_containers():
        module = container.get("command", dockerfile_exec_form(dockerfile, "CMD"))[2]
        pods[module] = deployment["spec"]["template"]["spec"]
    return pods


def compose_services_built_here() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items() if "build" in svc}


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    result = tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr
    # The same check refuses a misspelt key, so its pass above means something.
    broken = copy.deepcopy(compose())
    broken["services"]["worker"]["healthchek"] = broken["services"]["worker"].pop("healthcheck")
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(broken))
    refused = tool(
        "check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(tmp_path / "compose.yml")
    )
    assert refused.returncode == 1 and "healthchek" in refused.stdout


def test_dockerfiles_pass_hadolint() -> None:
    result = tool("hadolint", *DOCKERFILES.values())
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_the_worker_image_refuses_a_cpu_build_of_torch_and_the_api_image_any_torch() -> None:
    worker = " ".join(args for name, args in dockerfile_instructions("Dockerfile.worker"))
    assert "torch.version.cuda is None" in worker
    assert "constraints.txt" not in worker
    api = dockerfile_instructions("Dockerfile.api")
    assert any("find_spec('torch')" in args for name, args in api if name == "RUN")
    for path in DOCKERFILES.values():
        assert ("USER", "10001:10001") in dockerfile_instructions(path)


@pytest.mark.parametrize("components", VARIANTS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_match_the_kubernetes_schemas(
    version: str, components: tuple[str, ...]
) -> None:
    kinds = set()
    for doc in manifests(*components):
        if doc["kind"] in KEDA_MODELS:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.add(doc["kind"])
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret"}
    expected |= {"PersistentVolumeClaim", *COMPONENT_KINDS.get(components, ())}
    assert expected <= kinds
    # Strict validation refuses a misspelt field.
    broken = copy.deepcopy(manifest("Deployment", "txt2img-worker"))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 600
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def keda_validate(doc: dict[str, Any]) -> None:
    """Against KEDA's schema for the kind; a field the schema does not know is dropped by the
    model, so a round trip that loses anything is an unknown field."""
    parsed = KEDA_MODELS[doc["kind"]].model_validate(doc)
    assert parsed.model_dump(mode="json", by_alias=True, exclude_unset=True) == doc


@pytest.mark.parametrize("components", VARIANTS)
def test_keda_objects_match_kedas_schemas(components: tuple[str, ...]) -> None:
    keda = [doc for doc in manifests(*components) if doc["kind"] in KEDA_MODELS]
    assert "ScaledObject" in {doc["kind"] for doc in keda}
    for doc in keda:
        keda_validate(doc)
    broken = copy.deepcopy(manifest("ScaledObject", "txt2img-worker"))
    broken["spec"]["minReplicas"] = 0
    with pytest.raises(AssertionError):
        keda_validate(broken)
    broken = copy.deepcopy(manifest("ScaledObject", "txt2img-worker"))
    broken["spec"]["triggers"][0]["metadata"]["targetValue"] = 8
    with pytest.raises(ValueError):
        keda_validate(broken)


@pytest.mark.parametrize("components", VARIANTS)
def test_keda_scales_the_worker_on_its_queues_backlog_from_the_api_from_zero(
    components: tuple[str, ...],
) -> None:
    """In every variant: under Sentinel too, the trigger asks the API, which finds the primary."""
    docs = manifests(*components)
    scaler = manifest("ScaledObject", "txt2img-worker", docs)["spec"]
    worker = manifest("Deployment", "txt2img-worker", docs)
    assert scaler["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert scaler["minReplicaCount"] == 0
    (trigger,) = scaler["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    assert "authenticationRef" not in trigger, "/backlog needs no key, as /metrics"
    metadata = trigger["metadata"]
    # The API's Service, in the namespace the API runs in, on its port.
    url = urlparse(metadata["url"])
    api = manifest("Service", "txt2img-api", docs)
    (port,) = api["spec"]["ports"]
    assert url.scheme == "http" and url.path == "/backlog"
    service = f"{api['metadata']['name']}.{api['metadata']['namespace']}"
    assert url.hostname == f"{service}.svc.cluster.local"
    assert (url.port or 80) == port["port"]
    # The worker serves the default model (no model of its own beside the shared settings), so
    # its queue is T2I_QUEUE_NAME; one worker per batch of jobs.
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    own = {item["name"] for item in container.get("env", [])}
    assert not own & {"T2I_MODEL_ID", "T2I_MODEL_NAME", "T2I_DEFAULT_MODEL", "T2I_QUEUE_NAME"}
    queue = manifest("ConfigMap", "txt2img-config", docs)["data"]["T2I_QUEUE_NAME"]
    assert metadata["valueLocation"] == f"queues.{queue}.jobs"
    env = container_env(container, docs)
    max_batch = env.get("T2I_MAX_BATCH_IMAGES", str(WorkerSettings().max_batch_images))
    assert metadata["format"] == "json" and metadata["targetValue"] == max_batch
    # One job wakes the first worker.
    assert metadata["activationTargetValue"] == "0"


def settings_from(
    settings: type[SettingsT], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> SettingsT:
    """A settings class as a process with this environment reads it."""
    for name in setting_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        if name.startswith("T2I_"):
            monkeypatch.setenv(name, value)
    return settings()


def nginx_size(value: str) -> int:
    """An nginx size: bytes, or k, m, g of them (powers of 1024)."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    unit = value[-1].lower()
    return int(value[:-1]) * units[unit] if unit in units else int(value)


def ingress_routes(ingress: dict[str, Any], path: str) -> bool:
    """Whether one of the Ingress's rules takes a request for `path` (Kubernetes' Prefix matches
    whole path elements)."""
    for rule in ingress["spec"]["rules"]:
        for route in rule["http"]["paths"]:
            if route["pathType"] == "Exact" and path == route["path"]:
                return True
            prefix = route["path"].rstrip("/")
            if route["pathType"] == "Prefix" and (path == prefix or path.startswith(prefix + "/")):
                return True
    return False


def api_ingress() -> dict[str, Any]:
    (ingress,) = [doc for doc in manifests("ingress") if doc["kind"] == "Ingress"]
    return ingress


def test_the_ingress_reaches_the_api_service_over_tls_at_the_public_base_url() -> None:
    docs = manifests("ingress")
    ingress = api_ingress()["spec"]
    assert ingress["ingressClassName"]
    api = manifest("Service", "txt2img-api", docs)
    ports = {port["name"]: port["port"] for port in api["spec"]["ports"]}
    for rule in ingress["rules"]:
        for route in rule["http"]["paths"]:
            service = route["backend"]["service"]
            assert service["name"] == api["metadata"]["name"]
            port = service["port"]
            assert port.get("name") in ports or port.get("number") in ports.values(), port
    # The links the API sends (T2I_PUBLIC_BASE_URL) name the host the Ingress serves, over TLS.
    (container,) = pod_containers(manifest("Deployment", "txt2img-api", docs))
    public = urlparse(container_env(container, docs)["T2I_PUBLIC_BASE_URL"])
    assert public.scheme == "https" and public.path in ("", "/")
    assert [rule["host"] for rule in ingress["rules"]] == [public.hostname]
    (tls,) = ingress["tls"]
    assert tls["hosts"] == [public.hostname] and tls["secretName"]


def test_the_ingress_streams_events_waits_for_sync_answers_and_takes_input_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = manifests("ingress")
    annotations = api_ingress()["metadata"]["annotations"]
    (container,) = pod_containers(manifest("Deployment", "txt2img-api", docs))
    api = settings_from(ApiSettings, container_env(container, docs), monkeypatch)
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    # The OpenAI and AUTOMATIC1111 routes send nothing until the job is done.
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) > api.sync_wait_s
    # The largest body the API takes: a job with two base64 input images.
    body = nginx_size(annotations["nginx.ingress.kubernetes.io/proxy-body-size"])
    assert body >= api.max_body_bytes_with_images


def test_the_ingress_routes_every_public_path_and_none_of_the_internal_ones() -> None:
    from api.app import create_app

    internal = {"/metrics", "/backlog", "/ready"}
    # Besides the OpenAPI document's paths: the playground and the API reference.
    pages = {"/", "/playground", "/playground/playground.js", "/docs", "/redoc", "/openapi.json"}
    paths = set(create_app().openapi()["paths"]) | pages
    assert internal <= paths
    ingress = api_ingress()
    for path in paths:
        assert ingress_routes(ingress, path) == (path not in internal), path


def redis_conf(path: Path) -> dict[str, list[str]]:
    """A redis.conf or sentinel.conf: each directive's arguments, the `sentinel` ones by their
    subcommand (`sentinel monitor`)."""
    directives = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "sentinel":
            words = [f"sentinel {words[1]}", *words[2:]]
        if words:
            directives[words[0]] = words[1:]
    return directives


def statefulset_pod_address(host: str, docs: Docs) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(StatefulSet, its Service, ordinal) of a pod's DNS name `<set>-<ordinal>.<service>`."""
    pod, service_name = host.split(".")
    set_name, ordinal = pod.rsplit("-", 1)
    statefulset = manifest("StatefulSet", set_name, docs)
    service = manifest("Service", service_name, docs)
    assert statefulset["spec"]["serviceName"] == service_name
    assert service["spec"]["clusterIP"] == "None", "a DNS name per pod needs a headless Service"
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert 0 <= int(ordinal) < statefulset["spec"]["replicas"], host
    return statefulset, service, int(ordinal)


def service_port(service: dict[str, Any], statefulset: dict[str, Any], port: int) -> None:
    """`port` is one of the Service's, and the pods listen where it sends it."""
    (container,) = pod_containers(statefulset)
    listening = {item["name"]: item["containerPort"] for item in container["ports"]}
    (target,) = [item["targetPort"] for item in service["spec"]["ports"] if item["port"] == port]
    assert listening.get(target, target) == port


SENTINEL = K8S / "sentinel"


def test_under_sentinel_every_process_finds_the_primary_through_sentinels_that_exist() -> None:
    docs = manifests("sentinel")
    redis_settings = {}
    for deployment, container, _ in our_containers(docs):
        env = container_env(container, docs)
        redis_settings[deployment["metadata"]["name"]] = (
            env["T2I_REDIS_SENTINELS"],
            env["T2I_REDIS_SENTINEL_MASTER"],
            int(env["T2I_REDIS_REPLICA_ACKS"]),
        )
    # The API, the GPU workers and the webhook worker all talk to Redis, the same way.
    default = {deployment["metadata"]["name"] for deployment, _, _ in our_containers()}
    assert set(redis_settings) == default and len(default) >= 3
    ((sentinels, master, acks),) = set(redis_settings.values())
    assert master and acks >= 1
    # Every sentinel pod, each by its name under its headless Service, on the Service's port.
    ordinals = set()
    for host, port in host_ports(sentinels):
        statefulset, service, ordinal = statefulset_pod_address(host, docs)
        service_port(service, statefulset, port)
        (container,) = pod_containers(statefulset)
        assert container["command"][-2:] == ["/etc/redis/sentinel.sh", "/data/sentinel.conf"]
        ordinals.add(ordinal)
    assert len(ordinals) == statefulset["spec"]["replicas"] >= 3


def test_the_sentinel_set_keeps_the_durability_and_replica_acks_the_service_expects() -> None:
    docs = manifests("sentinel")
    (api,) = pod_containers(manifest("Deployment", "txt2img-api", docs))
    env = container_env(api, docs)
    redis_set = manifest("StatefulSet", "txt2img-redis", docs)
    sentinels = manifest("StatefulSet", "txt2img-sentinel", docs)
    redis, sentinel = redis_conf(SENTINEL / "redis.conf"), redis_conf(SENTINEL / "sentinel.conf")
    # deploy/redis.conf's durability and refusal to evict, on every Redis of the set.
    for directive, arguments in redis_conf(REPO_ROOT / "deploy/redis.conf").items():
        assert redis[directive] == arguments, directive
    # A replica may be down and the acks the service waits for still come.
    replicas = redis_set["spec"]["replicas"] - 1
    acks = int(env["T2I_REDIS_REPLICA_ACKS"])
    assert 1 <= acks <= replicas - 1
    assert 1 <= int(redis["min-replicas-to-write"][0]) <= replicas - 1
    budget = manifest("PodDisruptionBudget", "txt2img-redis", docs)["spec"]
    assert budget["maxUnavailable"] == 1
    # Redis refuses writes before the container reaches its memory limit.
    (container,) = pod_containers(redis_set)
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi") and redis["maxmemory"][0].endswith("gb")
    assert int(redis["maxmemory"][0][:-2]) < int(limit[:-2])
    # The sentinels watch the master the services ask for, by a majority of them, and notice a
    # dead primary well within a job's lease.
    master, primary, quorum = sentinel["sentinel monitor"]
    assert primary == "PRIMARY" and master == env["T2I_REDIS_SENTINEL_MASTER"]
    assert sentinels["spec"]["replicas"] // 2 < int(quorum) <= sentinels["spec"]["replicas"]
    assert sentinel["sentinel down-after-milliseconds"][0] == master
    lease_s = float(env.get("T2I_LEASE_S", CoreSettings().lease_s))
    assert 2 * int(sentinel["sentinel down-after-milliseconds"][1]) / 1000 < lease_s
    # The start scripts name each pod by its Service.
    own_service = {"txt2img-redis": "REDIS_SERVICE", "txt2img-sentinel": "SENTINEL_SERVICE"}
    for statefulset in (redis_set, sentinels):
        (container,) = pod_containers(statefulset)
        assert container["image"] == compose()["services"]["redis"]["image"]
        own = container_env(container, docs)
        name = statefulset["metadata"]["name"]
        assert own[own_service[name]] == statefulset["spec"]["serviceName"]
        # Before any sentinel knows a primary: pod 0 of the Redis set, on its Service's port.
        host, port = own["FIRST_PRIMARY"].split()
        first, service, ordinal = statefulset_pod_address(host, docs)
        assert first["metadata"]["name"] == "txt2img-redis" and ordinal == 0
        service_port(service, redis_set, int(port))
        # The password the Redis set requires is the one in T2I_REDIS_URL.
        assert own["REDIS_PASSWORD"] == parse_url(env["T2I_REDIS_URL"])["password"]


def run_start_script(
    tmp_path: Path, script: str, env: dict[str, str], reply: str, *args: str
) -> list[str]:
    """The redis-server argv a start script of deploy/k8s/sentinel ends in, with every sentinel
    giving `reply` (none answering when empty)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fakes = {
        "redis-cli": '[ -n "$FAKE_REPLY" ] || exit 1\nprintf "%s\\n" "$FAKE_REPLY"\n',
        "redis-server": 'printf "%s\\n" "$@" >"$ARGV_FILE"\n',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    argv_file = tmp_path / "argv"
    run_env = {
        **env,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_REPLY": reply,
        "ARGV_FILE": str(argv_file),
    }
    subprocess.run(["sh", str(SENTINEL / script), *args], env=run_env, check=True, timeout=60)
    return argv_file.read_text().splitlines()


def test_the_sentinel_sets_start_scripts_and_configs_run_as_redis_runs_them(
    tmp_path: Path,
) -> None:
    """The start scripts with a stand-in redis-cli (what the sentinels answer) and redis-server
    (the argv it gets), then the real redis-server with that argv on loopback: a primary that
    refuses writes until its replica follows it, and a sentinel watching the primary."""
    docs = manifests("sentinel")
    redis_env = container_env(
        pod_containers(manifest("StatefulSet", "txt2img-redis", docs))[0], docs
    )
    sentinel_env = container_env(
        pod_containers(manifest("StatefulSet", "txt2img-sentinel", docs))[0], docs
    )
    password = redis_env["REDIS_PASSWORD"]
    conf = str(SENTINEL / "redis.conf")
    auth = ["--requirepass", password, "--masterauth", password, "--replica-announce-ip"]

    def redis_argv(pod: int, reply: str = "") -> list[str]:
        env = {**redis_env, "HOSTNAME": f"txt2img-redis-{pod}"}
        return run_start_script(tmp_path, "redis.sh", env, reply)

    first = ["--replicaof", "txt2img-redis-0.txt2img-redis", "6379"]
    # No sentinel knows a primary yet: pod 0 is it, the others follow it.
    assert redis_argv(0) == [conf, *auth, "txt2img-redis-0.txt2img-redis"]
    assert redis_argv(2) == [conf, *auth, "txt2img-redis-2.txt2img-redis", *first]
    assert redis_argv(2, "ERR no such master") == redis_argv(2)
    # After a failover pod 0 comes back as a replica of the one the sentinels promoted.
    promoted = "txt2img-redis-1.txt2img-redis\n6379"
    assert redis_argv(1, promoted) == [conf, *auth, "txt2img-redis-1.txt2img-redis"]
    assert redis_argv(0, promoted)[-3:] == ["--replicaof", "txt2img-redis-1.txt2img-redis", "6379"]

    processes = []

    def serve(argv: list[str], name: str, *extra: str) -> int:
        port = free_port()
        workdir = tmp_path / name
        workdir.mkdir()
        flags = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), *extra]
        process = Process(name, ["redis-server", *argv, *flags], {}, tmp_path / f"{name}.log")
        processes.append(process.start())
        wait_until(lambda: port_open(port), 10, f"{name} on port {port}")
        return port

    try:
        primary_port = serve(redis_argv(0), "primary")
        primary = Redis(port=primary_port, password=password, decode_responses=True)
        assert primary.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert primary.config_get("appendonly")["appendonly"] == "yes"
        with pytest.raises(ResponseError, match="NOREPLICAS"):
            primary.set("job", "queued")
        serve(redis_argv(1, f"127.0.0.1\n{primary_port}"), "replica")

        def good_replicas() -> int:
            return primary.info("replication").get("min_slaves_good_slaves", 0)

        wait_until(lambda: good_replicas() >= 1, 20, "the replica to follow the primary")
        # What T2I_REDIS_REPLICA_ACKS=1 waits for.
        assert primary.set("job", "queued") and primary.wait(1, 5000) >= 1
        sentinel_conf = tmp_path / "sentinel.conf"
        env = {**sentinel_env, "HOSTNAME": "txt2img-sentinel-0"}
        argv = run_start_script(
            tmp_path, "sentinel.sh", env, f"127.0.0.1\n{primary_port}", str(sentinel_conf)
        )
        assert argv == [str(sentinel_conf), "--sentinel"]
        # A restarted container keeps what its sentinel learnt.
        kept = sentinel_conf.read_text()
        assert run_start_script(tmp_path, "sentinel.sh", env, "", str(sentinel_conf)) == argv
        assert sentinel_conf.read_text() == kept
        sentinel_port = serve(argv, "sentinel")
        master_name = sentinel_env["T2I_REDIS_SENTINEL_MASTER"]

        def watched() -> dict[str, Any]:
            client = Redis(port=sentinel_port, decode_responses=True)
            return client.sentinel_master(master_name)

        assert (watched()["ip"], watched()["port"]) == ("127.0.0.1", primary_port)
        assert watched()["quorum"] == 2 and watched()["down-after-milliseconds"] == 5000
        # It has read the primary's INFO (its run id), which takes the password.
        wait_until(lambda: bool(watched()["runid"]), 10, "the sentinel to read the primary")
        assert not watched()["is_disconnected"]
    finally:
        for process in processes:
            process.stop()


@cache
def first_key_job() -> dict[str, Any]:
    (job,) = kustomize(K8S / "first-api-key")
    return job


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_first_key_job_matches_the_kubernetes_schemas(version: str) -> None:
    assert first_key_job()["kind"] == "Job"
    kubernetes_validate.validate(first_key_job(), version, strict=True)


def test_the_first_key_job_runs_a_keyadmin_create_that_its_parser_accepts() -> None:
    (container,) = pod_containers(first_key_job())
    argv = [*container["command"], *container.get("args", [])]
    assert argv[:3] == ["python", "-m", "shared.keyadmin"]
    parsed = build_parser().parse_args(argv[3:])
    assert parsed.action == "create" and parsed.name
    # The API's image (it has shared/ and the key command), as deploy/k8s names it.
    (api,) = pod_containers(manifest("Deployment", "txt2img-api"))
    assert container["image"] == api["image"]
    namespace = manifest("Deployment", "txt2img-api")["metadata"]["namespace"]
    assert first_key_job()["metadata"]["namespace"] == namespace


@pytest.mark.parametrize("components", VARIANTS)
def test_the_first_key_job_reaches_the_redis_the_api_uses(components: tuple[str, ...]) -> None:
    """Applied beside any variant, the Job reads the settings the key command needs (where Redis
    is, under Sentinel too; the key defaults) as the API does."""
    docs = manifests(*components)
    (job,) = pod_containers(first_key_job())
    (api,) = pod_containers(manifest("Deployment", "txt2img-api", docs))
    needed = {f"T2I_{name.upper()}" for name in CoreSettings.model_fields}
    needed |= {"T2I_RATE_LIMIT_PER_MIN", "T2I_MAX_RUNNING_PER_KEY"}
    job_env, api_env = container_env(job, docs), container_env(api, docs)
    assert {n: v for n, v in job_env.items() if n in needed} == {
        n: v for n, v in api_env.items() if n in needed
    }
    assert "T2I_REDIS_URL" in job_env
    assert ("T2I_REDIS_SENTINELS" in job_env) == ("sentinel" in components)


def test_a_stopping_worker_hands_back_its_batch_before_kubernetes_kills_it() -> None:
    pod = manifest("Deployment", "txt2img-worker")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    grace_s = float(container_env(container)["T2I_SHUTDOWN_GRACE_S"])
    assert 0 < grace_s < pod["terminationGracePeriodSeconds"]


def mounted_volume(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume that holds `path` in the container: its deepest mount above it."""
    mounts = [
        mount
        for mount in container.get("volumeMounts", [])
        if Path(path).is_relative_to(mount["mountPath"])
    ]
    assert mounts, f"{path} is on the container's own filesystem"
    deepest = max(mounts, key=lambda mount: len(Path(mount["mountPath"]).parts))
    assert "subPath" not in deepest, deepest
    (volume,) = [v for v in pod["volumes"] if v["name"] == deepest["name"]]
    return volume


@pytest.mark.parametrize("components", VARIANTS)
def test_every_worker_pod_shares_one_model_cache_claim_where_its_settings_point(
    components: tuple[str, ...],
) -> None:
    """The weights (HF_HOME) and the compiled kernels (T2I_MODEL_CACHE_DIR/inductor) are on one
    ReadWriteMany claim that every worker pod mounts, so a pod KEDA adds starts warm."""
    docs = manifests(*components)
    claims = set()
    for deployment, container, dockerfile in our_containers(docs):
        if dockerfile != DOCKERFILES["txt2img-worker"]:
            continue
        pod = deployment["spec"]["template"]["spec"]
        env = {**dockerfile_env(dockerfile), **container_env(container, docs)}
        cache_dir = env.get("T2I_MODEL_CACHE_DIR", str(WorkerSettings().model_cache_dir))
        assert Path(cache_dir).is_absolute()
        for path in (cache_dir, f"{cache_dir}/inductor", env["HF_HOME"]):
            volume = mounted_volume(pod, container, path)
            assert "persistentVolumeClaim" in volume, (path, volume)
            claims.add(volume["persistentVolumeClaim"]["claimName"])
    (name,) = claims
    claim = manifest("PersistentVolumeClaim", name, docs)["spec"]
    assert claim["accessModes"] == ["ReadWriteMany"]
    assert claim["storageClassName"], "the operator names a class that offers ReadWriteMany"


def compose_duration_s(value: str) -> float:
    """A Compose duration: `1m30s`, `75s`, `10m`, `1h`..."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, value
    return sum(float(number) * units[unit] for number, unit in parts)


def test_compose_stops_each_process_as_gently_as_kubernetes_does() -> None:
    """Each process gets the stop grace its Kubernetes pod gets, and the worker hands its
    running batch back before Docker kills it."""
    pods = pod_specs_by_module()
    services = compose_services_built_here()
    for name, service in services.items():
        dockerfile = service["build"]["dockerfile"]
        module = (service.get("command") or dockerfile_exec_form(dockerfile, "CMD"))[2]
        grace_s = compose_duration_s(service["stop_grace_period"])
        assert grace_s == pods[module]["terminationGracePeriodSeconds"], name
    worker = services["worker"]
    shutdown_s = float(worker["environment"]["T2I_SHUTDOWN_GRACE_S"])
    assert 0 < shutdown_s < compose_duration_s(worker["stop_grace_period"])
    assert shutdown_s > WorkerSettings().shutdown_grace_s, "the default is for development"


def test_the_gpu_worker_gets_a_gpu_and_time_to_finish_its_batches() -> None:
    worker = manifest("Deployment", "txt2img-worker")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["tolerations"]
    assert pod["terminationGracePeriodSeconds"] >= 300
    compose_grace = compose()["services"]["worker"]["stop_grace_period"]
    assert compose_grace == f"{pod['terminationGracePeriodSeconds'] // 60}m"
    assert "replicas" not in worker["spec"], "KEDA owns the worker's replica count"
    hpa = manifest("HorizontalPodAutoscaler", "txt2img-api")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "txt2img-api"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    for budget in (d for d in manifests() if d["kind"] == "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        targets = [
            d
            for d in manifests()
            if d["kind"] == "Deployment"
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, budget["metadata"]["name"]


def _t2i_names(text: str) -> set[str]:
    return set(re.findall(r"\bT2I_[A-Z0-9_]+", text))


def test_every_t2i_name_the_deployment_files_set_is_a_real_setting() -> None:
    settings = setting_names()
    compose_names = {
        name
        for service in compose()["services"].values()
        for name in service.get("environment", {})
        if name.startswith("T2I_")
    }
    kubernetes_names = {
        name
        for _, container, _ in our_containers()
        for name in container_env(container)
        if name.startswith("T2I_")
    }
    dockerfile_names = {
        name for path in DOCKERFILES.values() for name in dockerfile_env(path) if "T2I_" in name
    }
    mentioned = set()
    for path in [COMPOSE, *REPO_ROOT.glob("deploy/**/*.*"), *REPO_ROOT.glob("Dockerfile.*")]:
        mentioned |= _t2i_names(path.read_text())
    assert len(compose_names) >= 10 and len(kubernetes_names) >= 10 and len(dockerfile_names) >= 4
    unknown = (compose_names | kubernetes_names | dockerfile_names | mentioned) - settings
    assert not unknown, f"not settings: {sorted(unknown)}"


def assert_accepted(argv: list[str], runs: str | None = None) -> str:
    """The module argv runs, after checking it is one of our processes (they take no arguments)
    or the health probe of the process `runs`."""
    assert argv[:2] == ["python", "-m"], argv
    module, *args = argv[2:]
    if module == "shared.probe":
        assert args in ([target] for target in PROBES), argv
        assert runs is None or args == [ENTRY_POINTS[runs]], (argv, runs)
    else:
        assert module in ENTRY_POINTS and args == [], argv
    return module


def test_commands_are_ones_our_processes_accept() -> None:
    checked = 0
    for path in DOCKERFILES.values():
        runs = assert_accepted(dockerfile_exec_form(path, "CMD"))
        assert_accepted(dockerfile_exec_form(path, "HEALTHCHECK"), runs)
        checked += 2
    for name, service in compose_services_built_here().items():
        dockerfile = service["build"]["dockerfile"]
        runs = assert_accepted(service.get("command") or dockerfile_exec_form(dockerfile, "CMD"))
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        assert_accepted(test[1:], runs)
        checked += 2
    for _, container, dockerfile in our_containers():
        argv = container.get("command", dockerfile_exec_form(dockerfile, "CMD"))
        assert_accepted([*argv, *container.get("args", [])])
        checked += 1
    assert checked >= 13
    # The probe itself refuses what it does not know.
    refused = subprocess.run(
        [sys.executable, "-m", "shared.probe", "sweeper"], cwd=REPO_ROOT, capture_output=True
    )
    assert refused.returncode == 2


def test_kubernetes_probes_and_scrape_annotations_use_the_ports_the_processes_listen_on() -> None:
    port_setting = {"api": "T2I_PORT", "worker": "T2I_METRICS_PORT"}
    port_setting["worker.webhooks"] = "T2I_WEBHOOK_METRICS_PORT"
    for deployment, container, dockerfile in our_containers():
        argv = container.get("command", dockerfile_exec_form(dockerfile, "CMD"))
        module = argv[2]
        env = {**dockerfile_env(dockerfile), **container_env(container)}
        port = int(env[port_setting[module]])
        ports = {item["name"]: item["containerPort"] for item in container["ports"]}
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == port
        assert annotations["prometheus.io/path"] == "/metrics"
        for probe in ("readinessProbe", "livenessProbe"):
            check = container[probe]["httpGet"]
            assert ports[check["port"]] == port, (module, probe)
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        ready = container["readinessProbe"]["httpGet"]["path"]
        # The API is ready without a worker: workers scale to zero and jobs wait for them.
        assert ready == ("/ready?require_worker=false" if module == "api" else "/ready")


def test_compose_prometheus_scrapes_each_process_on_its_metrics_port() -> None:
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus/compose.yml").read_text())
    services = compose()["services"]
    port_setting = {"api": "T2I_PORT", "worker": "T2I_METRICS_PORT"}
    port_setting["worker.webhooks"] = "T2I_WEBHOOK_METRICS_PORT"
    scraped = set()
    for job in config["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host, port = target.split(":")
            service = services[host]
            dockerfile = service["build"]["dockerfile"]
            module = (service.get("command") or dockerfile_exec_form(dockerfile, "CMD"))[2]
            env = {**dockerfile_env(dockerfile), **service["environment"]}
            assert int(env[port_setting[module]]) == int(port), target
            scraped.add(host)
    assert scraped == set(compose_services_built_here())


def test_minio_lifecycle_rule_matches_the_job_retention() -> None:
    init = compose()["services"]["minio-init"]["environment"]
    days = int(init["RETENTION_DAYS"])
    api_env = compose()["services"]["api"]["environment"]
    retention_s = int(api_env.get("T2I_RETENTION_S", CoreSettings().retention_s))
    assert days * 24 * 3600 == retention_s
    script = subprocess.run(["sh", "-n", str(REPO_ROOT / "deploy/minio/init.sh")])
    assert script.returncode == 0


def test_compose_redis_config_is_durable_and_needs_the_password(tmp_path: Path) -> None:
    """redis-server started the way compose starts it (its config file, then the command's
    flags), on loopback here instead of the compose network."""
    redis = compose()["services"]["redis"]
    password = "${REDIS_PASSWORD:?set REDIS_PASSWORD in .env}"
    argv = [arg.replace(password, "s3cret") for arg in redis["command"]]
    assert argv[1] == "/usr/local/etc/redis/redis.conf"
    port = free_port()
    argv[1] = str(REPO_ROOT / "deploy/redis.conf")
    server = Process(
        "compose-redis",
        [*argv, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        {},
        tmp_path / "redis.log",
    ).start()
    try:
        wait_until(lambda: port_open(port), 10, "redis-server with deploy/redis.conf")
        with pytest.raises((AuthenticationError, ResponseError)):
            Redis(port=port).ping()
        client = Redis(port=port, password="s3cret", decode_responses=True)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.close()
    finally:
        server.stop()
    assert "ports" not in redis, "Redis is never published"


SYSTEMD = REPO_ROOT / "deploy/systemd"
# Each unit and the module it runs.
SYSTEMD_UNITS = {
    "txt2img-api.service": "api",
    "txt2img-webhooks.service": "worker.webhooks",
    "txt2img-worker@.service": "worker",
}
GPU_INSTANCES = [str(gpu) for gpu in range(10)]


def systemd_unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections, each its (key, value) lines in order (keys like Environment= may
    repeat, which configparser would fold)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    section = None
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), "no continuation lines"
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            assert section not in sections, section
            sections[section] = []
            continue
        key, equals, value = line.partition("=")
        assert equals and section is not None, line
        sections[section].append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    (value,) = [v for k, v in unit[section] if k == key]
    return value


def env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile: KEY=VALUE lines, comments and blank lines skipped."""
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            name, _, value = line.partition("=")
            (env[name.strip()],) = shlex.split(value) or [""]
    return env


def unit_environment(name: str, instance: str = "") -> dict[str, str]:
    """The unit's Environment= lines, %i as the instance."""
    env = {}
    for key, value in systemd_unit(name)["Service"]:
        if key == "Environment":
            for assignment in shlex.split(value.replace("%i", instance)):
                variable, _, setting = assignment.partition("=")
                env[variable] = setting
    return env


def unit_env(name: str, instance: str = "") -> dict[str, str]:
    """What the unit's process gets: its Environment= lines, then its EnvironmentFile, which
    systemd lets win; the shipped example stands in for the installed file."""
    assert Path(unit_value(systemd_unit(name), "Service", "EnvironmentFile")).name == "txt2img.env"
    return {**unit_environment(name, instance), **env_file(SYSTEMD / "txt2img.env")}


def test_systemd_units_run_our_processes_from_the_checkout_and_always_restart_them() -> None:
    assert {path.name for path in SYSTEMD.glob("*.service")} == set(SYSTEMD_UNITS)
    for name, module in SYSTEMD_UNITS.items():
        unit = systemd_unit(name)
        service = dict(unit["Service"])
        # `python -m` finds our packages in the working directory, as in the images (WORKDIR).
        argv = shlex.split(unit_value(unit, "Service", "ExecStart"))
        assert argv == [f"{service['WorkingDirectory']}/.venv/bin/python", "-m", module], name
        assert_accepted(["python", *argv[1:]])
        # The worker exits on purpose (71) for its supervisor to start it again.
        assert service["Restart"] == "always" and int(service["RestartSec"]) > 0, name
        assert unit_value(unit, "Unit", "StartLimitIntervalSec") == "0", "restarts never stop"
        assert service["KillSignal"] == "SIGTERM" and service["User"] != "root"
        assert unit_value(unit, "Unit", "PartOf") == "txt2img.target"
        assert unit_value(unit, "Install", "WantedBy") == "txt2img.target"
    target = systemd_unit("txt2img.target")
    assert unit_value(target, "Install", "WantedBy") == "multi-user.target"


def test_systemd_units_stop_as_gently_as_kubernetes_and_the_worker_hands_back_in_time() -> None:
    pods = pod_specs_by_module()
    for name, module in SYSTEMD_UNITS.items():
        timeout_s = int(unit_value(systemd_unit(name), "Service", "TimeoutStopSec"))
        assert timeout_s == pods[module]["terminationGracePeriodSeconds"], name
        if module == "worker":
            grace_s = float(unit_env(name, "0")["T2I_SHUTDOWN_GRACE_S"])
            assert WorkerSettings().shutdown_grace_s < grace_s < timeout_s


def test_every_t2i_name_the_systemd_files_set_is_a_real_setting() -> None:
    settings = setting_names()
    shipped = env_file(SYSTEMD / "txt2img.env")
    own = set()
    for name in SYSTEMD_UNITS:
        names = {n for n in unit_env(name, "0") if n.startswith("T2I_")}
        assert names <= settings, f"not settings: {sorted(names - settings)}"
        own |= set(unit_environment(name, "0"))
    assert {n for n in shipped if n.startswith("T2I_")} <= settings
    mentioned = set()
    for path in SYSTEMD.iterdir():
        mentioned |= _t2i_names(path.read_text())
    assert mentioned <= settings, f"not settings: {sorted(mentioned - settings)}"
    # The env file sets nothing a unit sets for itself: it would override the unit's value.
    assert not set(shipped) & own


def test_each_gpu_worker_instance_gets_its_gpu_and_a_metrics_port_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken = {
        int(unit_env("txt2img-api.service")["T2I_PORT"]),
        int(unit_env("txt2img-webhooks.service")["T2I_WEBHOOK_METRICS_PORT"]),
    }
    for gpu in GPU_INSTANCES:
        env = unit_env("txt2img-worker@.service", gpu)
        assert env["CUDA_VISIBLE_DEVICES"] == gpu
        worker = settings_from(WorkerSettings, env, monkeypatch)
        assert worker.device == "cuda"
        assert worker.metrics_port > 1024 and worker.metrics_port not in taken, gpu
        taken.add(worker.metrics_port)
        # The cache the instances share is where the units' CacheDirectory puts it.
        assert worker.model_cache_dir == Path("/var/cache/txt2img")
        assert Path(env["HF_HOME"]).is_relative_to(worker.model_cache_dir)
    unit = systemd_unit("txt2img-worker@.service")
    assert unit_value(unit, "Service", "CacheDirectory") == "txt2img"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_accepts_the_units(tmp_path: Path) -> None:
    """systemd's own parser, on copies that run this virtual environment's Python (it refuses an
    ExecStart that is not there); any complaint about them fails."""
    for path in SYSTEMD.iterdir():
        text = path.read_text().replace("/opt/txt2img/.venv/bin/python", sys.executable)
        (tmp_path / path.name).write_text(text)
    units = ["txt2img-api.service", "txt2img-webhooks.service", "txt2img.target"]
    units += [f"txt2img-worker@{gpu}.service" for gpu in GPU_INSTANCES[:2]]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(tmp_path / unit) for unit in units)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if str(tmp_path) in line]
    assert not complaints, complaints
