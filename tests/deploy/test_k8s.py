"""The Kubernetes manifests of deploy/k8s, checked offline: no cluster runs here.

Every manifest, and every overlay as kustomize would render it, validates strictly against the bundled schemas
of a fixed Kubernetes release (kubernetes-validate); the ServiceMonitor, a custom resource with no bundled
schema, against the fields the Prometheus Operator requires. Then the facts that a schema cannot see: the
probes name routes the app serves, on the port it listens on; the Secret key read is the one defined; the HPA
scales this Deployment; the store is a ReadWriteMany claim mounted where LPT_STORE points; selectors select."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from starlette.routing import Match

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.serving.metrics import Metrics
from tests.deploy.test_docker import DOCKER_DIR, parse_dockerfile, replay

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# The oldest release the manifests are written for (the preStop `sleep` action is on by default from 1.30), and a
# recent one, so that an API removed since would show.
KUBERNETES_VERSIONS = ("1.31.0", "1.35.0")
OVERLAYS = {"base": K8S, "queue-depth": K8S / "queue-depth", "gpu": K8S / "gpu"}
KUSTOMIZATION = "kustomization.yaml"

Manifest = dict[str, Any]


# ---------------------------------------------------------------------------------------------- rendering
def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def json_pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def apply_json_patch(document: Manifest, operations: list[dict[str, Any]]) -> Manifest:
    """RFC 6902 add, replace and remove: what the overlays use (anything else fails the test)."""
    document = copy.deepcopy(document)
    for operation in operations:
        *parents, last = json_pointer(operation["path"])
        node: Any = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if isinstance(node, list):
            if op == "add":
                node.insert(len(node) if last == "-" else int(last), operation["value"])
            elif op == "replace":
                node[int(last)] = operation["value"]
            elif op == "remove":
                del node[int(last)]
            else:
                raise AssertionError(f"unsupported JSON patch op {op!r}")
        else:
            if op in ("replace", "remove"):
                assert last in node, f"{op} {operation['path']}: no such member to {op}"
            if op in ("add", "replace"):
                node[last] = operation["value"]
            elif op == "remove":
                del node[last]
            else:
                raise AssertionError(f"unsupported JSON patch op {op!r}")
    return document


def matches(target: dict[str, str], manifest: Manifest) -> bool:
    group, _, version = manifest["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": manifest["kind"], "name": manifest["metadata"]["name"]}
    return all(wanted[key] == value for key, value in target.items())


def render(folder: Path) -> list[Manifest]:
    """What `kustomize build folder` answers, for the features these kustomizations use: resources (files and
    other kustomizations) and JSON patches with a target. An unknown field fails, so that this stays true."""
    kustomization = yaml.safe_load((folder / KUSTOMIZATION).read_text())
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{folder}: teach render() about {sorted(unknown)}"
    assert kustomization["kind"] == "Kustomization"
    manifests: list[Manifest] = []
    for resource in kustomization.get("resources", []):
        path = (folder / resource).resolve()
        assert path.exists(), f"{folder / KUSTOMIZATION}: resource {resource} does not exist"
        manifests += render(path) if path.is_dir() else yaml_documents(path)
    for patch in kustomization.get("patches", []):
        patch_path = folder / patch["path"]
        assert patch_path.is_file(), f"{folder / KUSTOMIZATION}: patch {patch['path']} does not exist"
        [operations] = yaml_documents(patch_path)
        assert isinstance(operations, list), f"{patch_path}: only JSON patches (a list of operations) are rendered"
        targets = [i for i, m in enumerate(manifests) if matches(patch["target"], m)]
        assert len(targets) == 1, f"{patch_path}: its target {patch['target']} matches {len(targets)} manifests"
        manifests[targets[0]] = apply_json_patch(manifests[targets[0]], operations)
    names = [(m["kind"], m["metadata"]["name"]) for m in manifests]
    assert len(names) == len(set(names)), f"{folder}: a resource twice: {names}"
    return manifests


def manifest_files() -> list[Path]:
    """Every file of deploy/k8s that holds Kubernetes objects (not kustomizations, not patches)."""
    files = []
    for path in sorted(K8S.rglob("*.yaml")):
        documents = yaml_documents(path)
        if path.name != KUSTOMIZATION and all(isinstance(d, dict) and "kind" in d for d in documents):
            files.append(path)
    return files


def one(manifests: list[Manifest], kind: str) -> Manifest:
    [found] = [m for m in manifests if m["kind"] == kind]
    return found


def container(deployment: Manifest) -> Manifest:
    [found] = deployment["spec"]["template"]["spec"]["containers"]
    return found


def env_of(deployment: Manifest) -> dict[str, Manifest]:
    return {variable["name"]: variable for variable in container(deployment).get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


# -------------------------------------------------------------------------------- the ServiceMonitor's fields
# The fields of monitoring.coreos.com/v1 ServiceMonitor that the Prometheus Operator requires or that these
# manifests use; anything else is refused, so a misspelt field shows.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}}},
        },
        "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"], "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object", "minProperties": 1,
                                                            "additionalProperties": {"type": "string"}}}},
                "namespaceSelector": {"type": "object"},
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array", "minItems": 1,
                    "items": {
                        "type": "object", "required": ["port"], "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                        },
                    },
                },
            },
        },
    },
}


def validate(manifest: Manifest, version: str) -> None:
    if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
        jsonschema.validate(manifest, SERVICE_MONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.fixture(scope="module")
def serves(tmp_path_factory) -> Callable[[str], bool]:
    """Whether the app `lpt-serve` runs answers GET on a path with one of its routes (its router decides, as for a
    request; the app is built, not started: routing needs no backbone)."""
    app = create_app(Settings(store=tmp_path_factory.mktemp("store")))

    def answers_get(path: str) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}
        return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)

    assert answers_get("/tasks") and not answers_get("/no-such-route")  # the check itself tells the two apart
    return answers_get


# ------------------------------------------------------------------------------------------------- tests
def test_every_file_and_overlay_is_found() -> None:
    names = {p.relative_to(K8S).as_posix() for p in manifest_files()}
    assert {"deployment.yaml", "pvc.yaml", "service.yaml", "hpa.yaml", "pdb.yaml", "servicemonitor.yaml",
            "secret.yaml"} <= names, names
    kinds = {m["kind"] for m in render(K8S)}
    assert kinds == {"Deployment", "PersistentVolumeClaim", "Service", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "ServiceMonitor"}, kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_file_validates(path: Path, version: str) -> None:
    for manifest in yaml_documents(path):
        validate(manifest, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates(overlay: str, version: str) -> None:
    for manifest in render(OVERLAYS[overlay]):
        validate(manifest, version)


def test_the_validator_refuses_a_misspelt_field() -> None:
    # A validator that accepts anything would pass the tests above.
    deployment = copy.deepcopy(one(render(K8S), "Deployment"))
    container(deployment)["readinesProbe"] = container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    monitor = copy.deepcopy(one(render(K8S), "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["paht"] = "/metrics"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_routes_the_app_serves_on_its_port(overlay: str, serves: Callable[[str], bool]) -> None:
    deployment = one(render(OVERLAYS[overlay]), "Deployment")
    server = container(deployment)
    ports = {port["name"]: port["containerPort"] for port in server["ports"]}
    env = env_of(deployment)
    # The port the server binds (LPT_PORT, else the setting's default) is the one the container declares.
    listens = int(env["LPT_PORT"]["value"]) if "LPT_PORT" in env else Settings.model_fields["port"].default
    assert list(ports.values()) == [listens], f"the container declares {ports}; lpt-serve listens on {listens}"
    # And binds an address other pods reach.
    assert env.get("LPT_HOST", {}).get("value") == "0.0.0.0"
    probes = {kind: server[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        get = probe["httpGet"]
        assert get["port"] in ports or get["port"] == listens, f"{kind} probes port {get['port']}"
        assert serves(get["path"]), f"{kind} asks {get['path']}, which the app does not serve"
    # Readiness is the route that says "not ready" until the tasks are loaded; liveness only that the process answers.
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "a first start (warm-up, export) is slow"


def built_tags() -> dict[str, Path]:
    """Image tag -> the Dockerfile whose header says it builds it (`docker build -f docker/X -t TAG .`)."""
    tags = {}
    for dockerfile in sorted(DOCKER_DIR.glob("Dockerfile*")):
        for tag in re.findall(r"^#\s+docker build -f docker/\S+ -t (\S+)", dockerfile.read_text(), re.MULTILINE):
            tags[tag] = dockerfile
    return tags


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_image_is_built_here_listens_where_the_manifest_says_and_runs_as_its_user(overlay: str) -> None:
    deployment = one(render(OVERLAYS[overlay]), "Deployment")
    image = container(deployment)["image"]
    assert image in built_tags(), f"{image} is built by no Dockerfile of docker/ ({built_tags()})"
    dockerfile = built_tags()[image]
    built, _ = replay(dockerfile)
    [port] = [p["containerPort"] for p in container(deployment)["ports"]]
    assert int(built.env["LPT_PORT"]) == port, f"{dockerfile.name} sets LPT_PORT={built.env['LPT_PORT']}"
    users = [i.arguments for i in parse_dockerfile(dockerfile) if i.keyword == "USER"]
    # runAsNonRoot refuses an image whose user is root or a name it cannot check: the image's USER is this uid.
    assert users and users[-1] == str(deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"])
    # The GPU replicas run the CUDA image, the others the CPU one.
    wants_gpu = "nvidia.com/gpu" in container(deployment)["resources"]["limits"]
    assert (dockerfile.name == "Dockerfile.cuda") == wants_gpu, f"{overlay}: {image} with a GPU: {wants_gpu}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_lpt_variable_is_a_setting_and_their_values_parse(overlay: str, tmp_path: Path) -> None:
    env = env_of(one(render(OVERLAYS[overlay]), "Deployment"))
    names = {name for name in env if name.startswith("LPT_")}
    settings = {f"LPT_{field.upper()}" for field in Settings.model_fields}
    assert names <= settings, f"{sorted(names - settings)} name no setting (and would be ignored)"
    values = {name[4:].lower(): v["value"] for name, v in env.items() if name.startswith("LPT_") and "value" in v}
    values["store"] = str(tmp_path)  # the only value that must exist on this machine to validate
    Settings(**values)  # raises on a value lpt-serve would refuse at start


def test_the_admin_token_is_read_from_the_key_the_secret_defines() -> None:
    [secret] = yaml_documents(K8S / "secret.yaml")
    for overlay, folder in OVERLAYS.items():
        reference = env_of(one(render(folder), "Deployment"))["LPT_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"], overlay
        assert reference["key"] in {**secret.get("stringData", {}), **secret.get("data", {})}, overlay
    # No real token ships: the value is empty (admin routes off) until the operator sets one.
    assert not secret.get("data") and set(secret["stringData"].values()) == {""}
    # And applying the manifests never overwrites a token once set: the Secret is not among the resources.
    assert all(m["kind"] != "Secret" for folder in OVERLAYS.values() for m in render(folder))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_store_is_a_read_write_many_claim_mounted_at_lpt_store(overlay: str) -> None:
    manifests = render(OVERLAYS[overlay])
    deployment, claim = one(manifests, "Deployment"), one(manifests, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica mounts the store read-write at once"
    [volume] = [v for v in deployment["spec"]["template"]["spec"]["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
    [mount] = [m for m in container(deployment)["volumeMounts"] if m["name"] == volume["name"]]
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    assert mount["mountPath"] == env_of(deployment)["LPT_STORE"]["value"]


def test_every_path_the_server_writes_is_writable_under_a_read_only_root() -> None:
    deployment = one(render(K8S), "Deployment")
    server = container(deployment)
    assert server["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"] for m in server["volumeMounts"] if not m.get("readOnly")}
    # The store, uploads spooled to /tmp, and the ONNX export cache (~/.cache of the image's user).
    assert {env_of(deployment)["LPT_STORE"]["value"], "/tmp", "/home/lpt/.cache"} <= mounts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_pods(overlay: str) -> None:
    manifests = render(OVERLAYS[overlay])
    deployment, service = one(manifests, "Deployment"), one(manifests, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert selects(service["spec"]["selector"], pod_labels)
    assert selects(one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    for constraint in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert selects(constraint["labelSelector"]["matchLabels"], pod_labels)
    # The ServiceMonitor finds the Service by its labels, and its endpoint by the Service port's name.
    monitor = one(manifests, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    container_ports = {port["name"] for port in container(deployment)["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
    for port in service_ports.values():
        assert port["targetPort"] in container_ports, f"the Service sends to port {port['targetPort']!r}"


def test_metrics_are_scraped_from_the_route_that_serves_them(serves: Callable[[str], bool]) -> None:
    for endpoint in one(render(K8S), "ServiceMonitor")["spec"]["endpoints"]:
        assert serves(endpoint.get("path", "/metrics"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_autoscaler_scales_this_deployment_on_what_it_can_measure(overlay: str) -> None:
    manifests = render(OVERLAYS[overlay])
    deployment, autoscaler = one(manifests, "Deployment"), one(manifests, "HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"], deployment["kind"], deployment["metadata"]["name"])
    # The autoscaler owns the count: a `replicas` in the Deployment would reset it at every apply.
    assert "replicas" not in deployment["spec"]
    # A disruption budget of one replica leaves one serving only if there are at least two.
    assert autoscaler["spec"]["minReplicas"] >= 2
    assert one(manifests, "PodDisruptionBudget")["spec"]["maxUnavailable"] < autoscaler["spec"]["minReplicas"]
    exposed = {collector._name for collector in Metrics().__dict__.values() if hasattr(collector, "_name")}
    for metric in autoscaler["spec"]["metrics"]:
        if metric["type"] == "Resource":
            # Utilization is a share of the request: without a request the HPA cannot compute it.
            name = metric["resource"]["name"]
            assert name in container(deployment)["resources"]["requests"], f"no {name} request to scale on"
        else:
            assert metric["type"] == "Pods"
            # The series prometheus-adapter reads is one /metrics exposes (a gauge, averaged per pod).
            assert metric["pods"]["metric"]["name"] in exposed, f"{metric} names no metric of the server"
    kinds = {metric["type"] for metric in autoscaler["spec"]["metrics"]}
    assert kinds == ({"Resource"} if overlay == "base" else {"Pods"})


def test_the_gpu_overlay_gives_each_replica_one_gpu() -> None:
    deployment = one(render(OVERLAYS["gpu"]), "Deployment")
    resources = container(deployment)["resources"]
    # Extended resources are requested in the limits; a request, if given, must equal the limit.
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == resources["limits"]["nvidia.com/gpu"]
    assert env_of(deployment)["LPT_DEVICE"]["value"] == "cuda"
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    base = container(one(render(K8S), "Deployment"))["resources"]
    assert "nvidia.com/gpu" not in base["limits"], "the CPU base asks for no GPU"


def test_a_stopping_replica_finishes_its_requests_within_the_grace_period() -> None:
    spec = one(render(K8S), "Deployment")["spec"]["template"]["spec"]
    pause = container({"spec": {"template": {"spec": spec}}})["lifecycle"]["preStop"]["sleep"]["seconds"]
    # SIGTERM comes after the preStop pause; the server then waits up to request_timeout_s for requests in flight.
    assert spec["terminationGracePeriodSeconds"] > pause + Settings.model_fields["request_timeout_s"].default
