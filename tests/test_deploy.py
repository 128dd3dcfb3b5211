"""Deployment, validated offline: every overlay renders, passes strict schema validation and keeps our invariants.

No Kubernetes cluster and no Docker engine run here; the multi-pod behaviour is tested with real processes
in tests/test_sharded.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.parent.name for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (make setup installs it from PyPI)")
    return str(found)


def render(overlay: str) -> list[dict]:
    result = subprocess.run([tool("kubectl"), "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                            text=True, check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def workloads(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet")}


def test_overlays_exist() -> None:
    assert {"cpu", "gpu", "dev", "cpu-tls"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_strict_schema_validation(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(render(overlay)))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workload_invariants(overlay: str) -> None:
    objects = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "embedder"), ("StatefulSet", "searcher"), ("HorizontalPodAutoscaler", "embedder"),
            ("PodDisruptionBudget", "embedder"), ("PodDisruptionBudget", "searcher"), ("Service", "embedder"),
            ("Service", "searcher"), ("NetworkPolicy", "lookalike-servers"), ("ConfigMap", "embedder"),
            ("ConfigMap", "searcher")} <= kinds
    for name, workload in workloads(objects).items():
        pod = workload["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] != 0
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            assert not container["image"].endswith(":latest") and ":" in container["image"], container["image"]
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
        server = pod["spec"]["containers"][0]
        ports = {p["containerPort"] for p in server["ports"]}
        grpc_port = 50051 if name == "embedder" else 50052
        assert grpc_port in ports and 9100 in ports
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in server[probe], f"{name} {probe} must be a native grpc probe"
            port = server[probe]["grpc"]["port"]
            assert port == grpc_port or (overlay.endswith("tls") and port == grpc_port + 10)
    searcher = workloads(objects)["searcher"]
    assert searcher["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    mounts = {m["name"]: m["mountPath"] for m in searcher["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/data"
    startup = searcher["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "long index loads must not be killed"
    assert searcher["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60, "time to snapshot"
    headless = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "searcher")
    assert headless["spec"]["clusterIP"] == "None" and searcher["spec"]["serviceName"] == "searcher"


def test_gpu_overlay_requests_a_gpu_and_the_gpu_image() -> None:
    objects = render("gpu")
    embedder = workloads(objects)["embedder"]["spec"]["template"]["spec"]["containers"][0]
    assert embedder["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert embedder["image"].startswith("lookalike-embedder-gpu:")
    config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "embedder")
    assert config["data"]["LOOKALIKE_EMBEDDER_PROVIDERS"] == "tensorrt,cuda,cpu"
    assert "nvidia.com/gpu" not in str(workloads(render("cpu"))["embedder"])


def test_tls_overlay_mounts_the_secret_and_serves_plain_health_for_probes() -> None:
    objects = render("cpu-tls")
    for name, config_key in (("embedder", "LOOKALIKE_EMBEDDER"), ("searcher", "LOOKALIKE_SEARCHER")):
        config = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)
        assert config["data"][f"{config_key}_TLS_CERT"] == "/tls/tls.crt"
        spec = workloads(objects)[name]["spec"]["template"]["spec"]
        assert any(v.get("secret", {}).get("secretName") == "lookalike-tls" for v in spec["volumes"])


DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_invariants(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    for base in bases:
        assert ":" in base and not base.endswith(":latest"), f"{dockerfile.name}: unpinned base {base}"
    final_stage = text.split("\nFROM ")[-1]
    user = re.findall(r"^USER\s+(\S+)", final_stage, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root"), f"{dockerfile.name}: final stage must not run as root"
    if dockerfile.name != "model.Dockerfile":
        assert len(bases) >= 2, "multi-stage: build tools stay out of the runtime image"
        exposed = " ".join(re.findall(r"^EXPOSE\s+(.+)$", text, flags=re.MULTILINE))
        expected = "50052" if "searcher" in dockerfile.name else "50051"
        assert expected in exposed and "9100" in exposed
    for command in re.findall(r"apt-get install((?:[^\n&]|\\\n)*)", text):
        packages = [word for word in command.split() if not word.startswith("-") and word != "\\"]
        assert packages and all("=" in package for package in packages), f"unpinned apt packages: {packages}"
    if "searcher" in dockerfile.name:
        assert "HNSWLIB_NO_NATIVE=1" in text


def test_gpu_image_installs_onnxruntime_gpu_not_the_cpu_build() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0] for d in extras["embedder-gpu"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert "[embedder-gpu]" in (DEPLOY / "docker" / "embedder-gpu.Dockerfile").read_text()
