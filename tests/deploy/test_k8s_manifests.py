"""deploy/k8s: every overlay renders with `kubectl kustomize`, every object validates against the Kubernetes
OpenAPI schemas (kubernetes-validate, pinned version), and the pieces fit together: the router finds the
instances through the headless Services, probes hit the health endpoints, GPUs only where they are used."""
from __future__ import annotations

import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBERNETES_VERSION = "1.32.0"  # the API the manifests target (gRPC probes: GA since 1.27)
# Where the programs read their HACK_* variables: router and KV flags name them in full, services through env("X").
FLAG_SOURCES = ("router/main.py", "common/service.py", "common/kv/options.py", "prefill_service/main.py",
                "decode_service/main.py")
SECRET_VARIABLES = {"HACK_API_KEY", "HACK_INTERNAL_TOKEN"}  # router auth and the internal token (issue #16)
ROLES = ("router", "prefill", "decode")


@cache
def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders the kustomizations: the `kubectl` package)")
    result = subprocess.run([kubectl, "kustomize", str(K8S_DIR / "overlays" / overlay)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def container(objects: list[dict], role: str) -> dict:
    return find(objects, "Deployment", f"hack-{role}")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="the dev extra installs it")
    objects = render(overlay)
    kinds = sorted({o["kind"] for o in objects})
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "PodDisruptionBudget",
                     "Service"]
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] == "hack-serve"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_router_finds_the_instances_through_the_headless_services(overlay):
    objects = render(overlay)
    config = find(objects, "ConfigMap", "hack-config")["data"]
    for role, variable in (("prefill", "HACK_PREFILL"), ("decode", "HACK_DECODE")):
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", config[variable])
        assert match, config[variable]
        service = find(objects, "Service", match.group(1))["spec"]
        assert service["clusterIP"] == "None"
        assert [p["port"] for p in service["ports"]] == [int(match.group(2))]
        pods = find(objects, "Deployment", f"hack-{role}")["spec"]["template"]["metadata"]["labels"]
        assert service["selector"].items() <= pods.items()
        assert container(objects, role)["ports"][0]["containerPort"] == int(match.group(2))
    advertise = {e["name"]: e for e in container(objects, "decode")["env"]}["HACK_ADVERTISE_HOST"]
    assert advertise["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_drain_secrets_and_scraping(overlay):
    objects = render(overlay)
    for role in ROLES:
        deployment = find(objects, "Deployment", f"hack-{role}")
        pod = deployment["spec"]["template"]
        main = pod["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert ("httpGet" if role == "router" else "grpc") in main[probe], (role, probe)
        if role != "router":
            service = f"hack.v1.{role.capitalize()}Service"
            assert main["readinessProbe"]["grpc"]["service"] == service
        pre_stop_s = int(main["lifecycle"]["preStop"]["exec"]["command"][1])
        assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop_s + 30
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in main["env"] if "valueFrom" in e
                   and "secretKeyRef" in e["valueFrom"]}
        assert secrets == ({name: "hack-secrets" for name in SECRET_VARIABLES} if role == "router"
                           else {"HACK_INTERNAL_TOKEN": "hack-secrets"})
        assert main["envFrom"] == [{"configMapRef": {"name": "hack-config"}}]
        budget = find(objects, "PodDisruptionBudget", f"hack-{role}")["spec"]["selector"]["matchLabels"]
        assert budget.items() <= pod["metadata"]["labels"].items()
    router_pod = find(objects, "Deployment", "hack-router")["spec"]["template"]["metadata"]
    assert router_pod["annotations"]["prometheus.io/scrape"] == "true"
    assert router_pod["annotations"]["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_go_to_the_instances_only(overlay):
    objects = render(overlay)
    for role in ROLES:
        limits = container(objects, role)["resources"]["limits"]
        expected = 1 if overlay == "gpu" and role != "router" else None
        assert limits.get("nvidia.com/gpu") == expected, role
    device = find(objects, "ConfigMap", "hack-config")["data"]["HACK_DEVICE"]
    assert device == ("cuda" if overlay == "gpu" else "cpu")


def test_every_configured_variable_is_a_flag():
    sources = "".join((REPO_ROOT / path).read_text() for path in FLAG_SOURCES)
    known = set(re.findall(r"HACK_[A-Z0-9_]+", sources))
    known |= {f"HACK_{name}" for name in re.findall(r'env\("([A-Z0-9_]+)"', sources)}
    for overlay in OVERLAYS:
        objects = render(overlay)
        variables = set(find(objects, "ConfigMap", "hack-config")["data"])
        for role in ROLES:
            variables |= {e["name"] for e in container(objects, role)["env"]}
        assert variables - known - SECRET_VARIABLES == set(), overlay
