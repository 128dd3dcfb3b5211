"""Deployment, validated offline: every overlay renders, passes strict schema validation and keeps our invariants.

No Kubernetes cluster and no Docker engine run here; the multi-pod behaviour is tested with real processes
in tests/test_sharded.py.
"""
from __future__ import annotations

import os
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
# overlays/green is a second release beside the first: every name carries -green.
FIRST_RELEASES = [overlay for overlay in OVERLAYS if overlay != "green"]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (make setup installs it from PyPI)")
    return str(found)


def render(overlay: str | Path) -> list[dict]:
    """The objects of an overlay: one of deploy/overlays by name, or a folder (overlay_with's copies)."""
    folder = overlay if isinstance(overlay, Path) else DEPLOY / "overlays" / overlay
    result = subprocess.run([tool("kubectl"), "kustomize", str(folder)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def overlay_with(tmp_path: Path, overlay: str, **extra: list) -> Path:
    """A copy of an overlay in tmp_path with entries added to its kustomization (components, a
    configMapGenerator, ...), as a user would add them. Kustomize refuses absolute paths, so the copy's
    paths to other folders (its own and the Path entries of `extra`) are rewritten relative to it."""
    source, copy = DEPLOY / "overlays" / overlay, tmp_path / overlay
    shutil.copytree(source, copy)
    kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
    for key in ("resources", "components"):
        kustomization[key] = [os.path.relpath(source / entry, copy) if entry.startswith("..") else entry
                              for entry in kustomization.get(key, [])]
    for key, entries in extra.items():
        kustomization[key] = kustomization.get(key, []) + [os.path.relpath(e, copy) if isinstance(e, Path) else e
                                                           for e in entries]
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return copy


def workloads(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in ("Deployment", "StatefulSet")}


def config_refs(workload: dict) -> set[str]:
    """Every ConfigMap a workload's pods name: envFrom, env valueFrom, volumes (projected ones included)."""
    spec = workload["spec"]["template"]["spec"]
    names = set()
    for container in spec.get("initContainers", []) + spec["containers"]:
        names |= {e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e}
        names |= {e["valueFrom"]["configMapKeyRef"]["name"] for e in container.get("env", [])
                  if "configMapKeyRef" in e.get("valueFrom", {})}
    for volume in spec.get("volumes", []):
        sources = [volume] + volume.get("projected", {}).get("sources", [])
        names |= {source["configMap"]["name"] for source in sources if "configMap" in source}
    return names


def config_of(objects: list[dict], workload: str) -> dict[str, str]:
    """The settings a server reads: the data of the ConfigMaps its container takes its environment from."""
    container = workloads(objects)[workload]["spec"]["template"]["spec"]["containers"][0]
    names = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    assert names, f"{workload} takes no ConfigMap"
    return {key: value for name in names for key, value in named(objects, "ConfigMap", name)["data"].items()}


# Overlays with replicated searchers over PostgreSQL (components/replicated-searchers): two replica groups
# instead of the single `searcher` StatefulSet of the SQLite layout.
REPLICATED = sorted(o for o in OVERLAYS if o.startswith("replicated"))
GROUPS = ("a", "b")
DSN_SECRET = "lookalike-postgres-app"
# Custom resources kubernetes-validate has no schema for. It only warns about them and exits 0, so they
# are kept out of the strict validation below (which then tolerates no warning at all, so no built-in
# kind escapes it) and their essential fields are asserted by test_cnpg_cluster instead.
CUSTOM_RESOURCES = {("postgresql.cnpg.io/v1", "Cluster")}


def test_overlays_exist() -> None:
    assert {"cpu", "gpu", "dev", "cpu-tls", "replicated", "replicated-dev", "replicated-tls"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_strict_schema_validation(overlay: str, tmp_path: Path) -> None:
    built_in = [o for o in render(overlay) if (o["apiVersion"], o["kind"]) not in CUSTOM_RESOURCES]
    rendered = tmp_path / f"{overlay}.yaml"
    rendered.write_text(yaml.safe_dump_all(built_in))
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "--quiet", str(rendered)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # A kind without a schema is only a warning: fail on it, so every built-in object is validated.
    assert "Couldn't find schema" not in result.stdout + result.stderr, result.stdout + result.stderr


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def searchers(objects: list[dict]) -> dict[str, dict]:
    return {n: w for n, w in workloads(objects).items() if pod_labels(w).get("app.kubernetes.io/name") == "searcher"}


def servers(objects: list[dict]) -> dict[str, dict]:
    """Our gRPC servers (embedder, searchers), by label: overlays/green renames them."""
    return {n: w for n, w in workloads(objects).items() if pod_labels(w).get("lookalike.io/role") == "server"}


def named(objects: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", FIRST_RELEASES)
def test_workload_invariants(overlay: str) -> None:
    objects = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "embedder"), ("HorizontalPodAutoscaler", "embedder"), ("PodDisruptionBudget", "embedder"),
            ("Service", "embedder"), ("NetworkPolicy", "lookalike-servers")} <= kinds
    # (ConfigMaps carry a hash suffix: test_config_maps_are_generated_so_a_change_rolls_the_pods.)
    sqlite_searcher = {("StatefulSet", "searcher"), ("PodDisruptionBudget", "searcher"), ("Service", "searcher")}
    if overlay in REPLICATED:
        assert not sqlite_searcher & kinds, "the replicated layout replaces the SQLite searcher entirely"
        assert set(searchers(objects)) == {f"searcher-{g}" for g in GROUPS}
    else:
        assert sqlite_searcher <= kinds
        assert set(searchers(objects)) == {"searcher"}
    # Every workload, PostgreSQL's included: pinned images, non-root, locked-down containers with limits.
    for name, workload in workloads(objects).items():
        pod = workload["spec"]["template"]
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["securityContext"]["runAsUser"] != 0
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            assert not container["image"].endswith(":latest") and ":" in container["image"], container["image"]
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
    # Our gRPC servers: metrics, native grpc probes.
    assert set(servers(objects)) == {"embedder"} | set(searchers(objects))
    for name, workload in servers(objects).items():
        pod = workload["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        server = pod["spec"]["containers"][0]
        ports = {p["containerPort"] for p in server["ports"]}
        grpc_port = 50051 if name == "embedder" else 50052
        assert grpc_port in ports and 9100 in ports
        # Startup and readiness on the health-only port (its own threads: a server whose handler threads are
        # all busy with long calls stays ready); liveness too (on the serving port, gRPC's RPC limit refuses health
        # checks of a pod busy at it).
        health_port = grpc_port + 10
        config = config_of(objects, name)
        assert next(v for k, v in config.items() if k.endswith("_HEALTH_ADDRESS")) == f"[::]:{health_port}"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" in server[probe], f"{name} {probe} must be a native grpc probe"
        assert {server[probe]["grpc"]["port"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")} == {
            health_port}
        liveness = server["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60, "only a server silent for a minute"
        assert server["readinessProbe"]["grpc"]["service"] == ("lookalike.v1.Embedder" if name == "embedder"
                                                                 else "lookalike.v1.Searcher")
    for name, searcher in searchers(objects).items():
        assert searcher["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        container = searcher["spec"]["template"]["spec"]["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["data"] == "/data"
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "long index loads must not be killed"
        assert searcher["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60, "time to snapshot"
        headless = named(objects, "Service", searcher["spec"]["serviceName"])
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False


@pytest.mark.parametrize("overlay", REPLICATED)
def test_replicated_searcher_groups(overlay: str) -> None:
    objects = render(overlay)
    groups = searchers(objects)
    all_pods = {n: pod_labels(w) for n, w in workloads(objects).items()}

    def selected_by(selector: dict[str, str]) -> set[str]:
        return {n for n, labels in all_pods.items() if selects(selector, labels)}

    for group in GROUPS:
        name = f"searcher-{group}"
        statefulset = groups[name]
        assert statefulset["spec"]["replicas"] >= 2, "a group survives the loss of one replica"
        assert pod_labels(statefulset)["lookalike.io/searcher-group"] == group
        assert selected_by(statefulset["spec"]["selector"]["matchLabels"]) == {name}
        container = statefulset["spec"]["template"]["spec"]["containers"][0]
        env = container["env"]
        values = {e["name"]: e for e in env}
        # The DSN holds a password: only ever from the Secret, and required (an empty one means SQLite).
        store = values["LOOKALIKE_SEARCHER_STORE"]
        assert "value" not in store
        assert store["valueFrom"]["secretKeyRef"]["name"] == DSN_SECRET
        assert store["valueFrom"]["secretKeyRef"]["key"] == "uri"
        assert store["valueFrom"]["secretKeyRef"].get("optional", False) is False
        assert "postgresql://" not in yaml.safe_dump(statefulset)
        assert values["LOOKALIKE_SEARCHER_GROUP"]["value"] == group
        # ADVERTISE names this group's headless Service, in the pod's own namespace.
        advertise = re.fullmatch(r"dns:///([^.]+)\.([^.]+)\.svc\.cluster\.local:50052",
                                 values["LOOKALIKE_SEARCHER_ADVERTISE"]["value"])
        assert advertise, values["LOOKALIKE_SEARCHER_ADVERTISE"]
        assert advertise[1] == statefulset["spec"]["serviceName"] == name
        if advertise[2] == "$(POD_NAMESPACE)":
            # Kubernetes expands $(VAR) only from variables defined earlier in the list.
            names = [e["name"] for e in env]
            assert names.index("POD_NAMESPACE") < names.index("LOOKALIKE_SEARCHER_ADVERTISE")
            assert values["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        else:
            assert advertise[2] == statefulset["metadata"]["namespace"]
        # Its headless Service and its PDB select exactly its own pods.
        service = named(objects, "Service", name)
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is False
        assert selected_by(service["spec"]["selector"]) == {name}
        budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"
                   and selected_by(o["spec"]["selector"]["matchLabels"]) & {name}]
        assert len(budgets) == 1 and budgets[0]["metadata"]["name"] == name, budgets
        assert selected_by(budgets[0]["spec"]["selector"]["matchLabels"]) == {name}
        assert budgets[0]["spec"]["maxUnavailable"] == 1, "a drain keeps the other replica serving"
        # The group's replicas are spread over nodes (a single-node dev cluster may only prefer it).
        spread = [c for c in statefulset["spec"]["template"]["spec"]["topologySpreadConstraints"]
                  if c["topologyKey"] == "kubernetes.io/hostname"]
        assert len(spread) == 1 and selected_by(spread[0]["labelSelector"]["matchLabels"]) == {name}
        expected = "ScheduleAnyway" if overlay.endswith("-dev") else "DoNotSchedule"
        assert spread[0]["whenUnsatisfiable"] == expected and spread[0]["maxSkew"] == 1
    # No ConfigMap carries a DSN or the store setting.
    for config in (o for o in objects if o["kind"] == "ConfigMap"):
        assert "postgresql://" not in yaml.safe_dump(config)
        assert "LOOKALIKE_SEARCHER_STORE" not in config.get("data", {})
    # The base policy restricts ingress only; if a policy ever restricts the searchers' egress, it must
    # let them reach PostgreSQL.
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        if "Egress" in policy["spec"].get("policyTypes", []) and selected_by(policy["spec"]["podSelector"].get(
                "matchLabels", {})) & set(groups):
            ports = {p.get("port") for rule in policy["spec"].get("egress", []) for p in rule.get("ports", [])}
            assert 5432 in ports, "searchers must reach PostgreSQL on 5432"


def test_cnpg_cluster() -> None:
    objects = render("replicated")
    clusters = [o for o in objects if (o["apiVersion"], o["kind"]) == ("postgresql.cnpg.io/v1", "Cluster")]
    assert len(clusters) == 1
    cluster = clusters[0]
    spec = cluster["spec"]
    assert cluster["metadata"]["name"] == "lookalike-postgres"
    assert cluster["metadata"]["namespace"] == named(objects, "StatefulSet", "searcher-a")["metadata"]["namespace"]
    assert spec["instances"] == 3
    image = spec["imageName"]
    assert image.startswith("ghcr.io/cloudnative-pg/postgresql:") and re.fullmatch(r".*:\d+\.\d+.*", image), image
    assert re.fullmatch(r"\d+(\.\d+)?[MGT]i", spec["storage"]["size"])
    assert spec["bootstrap"]["initdb"] == {"database": "lookalike", "owner": "lookalike"}
    assert spec.get("enablePDB", True) is True
    # Acknowledged writes survive a failover only with a synchronous standby (sequence numbers never reused).
    assert spec["postgresql"]["synchronous"] == {"method": "any", "number": 1, "dataDurability": "required"}
    assert spec["resources"]["requests"] and spec["resources"]["limits"]
    # The operator writes lookalike-postgres-app (named after the cluster) itself; a rendered one would fight it.
    assert DSN_SECRET == f"{cluster['metadata']['name']}-app"
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_dev_postgres_matches_the_searchers_dsn() -> None:
    from urllib.parse import urlsplit

    objects = render("replicated-dev")
    secret = named(objects, "Secret", DSN_SECRET)["stringData"]
    dsn = urlsplit(secret["uri"])
    assert (dsn.scheme, dsn.hostname, dsn.port, dsn.path) == ("postgresql", "lookalike-postgres-rw", 5432,
                                                              "/" + secret["POSTGRES_DB"])
    assert (dsn.username, dsn.password) == (secret["POSTGRES_USER"], secret["POSTGRES_PASSWORD"])
    postgres = named(objects, "StatefulSet", "lookalike-postgres")
    assert postgres["spec"]["replicas"] == 1 and postgres["spec"]["volumeClaimTemplates"]
    service = named(objects, "Service", "lookalike-postgres-rw")
    assert service["spec"]["ports"][0]["port"] == 5432
    assert selects(service["spec"]["selector"], pod_labels(postgres))
    assert not selects(service["spec"]["selector"], pod_labels(searchers(objects)["searcher-a"]))
    container = postgres["spec"]["template"]["spec"]["containers"][0]
    assert re.fullmatch(r"postgres:\d+-bookworm(@sha256:[0-9a-f]{64})?", container["image"]), container["image"]
    assert container["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env[key] == {"name": DSN_SECRET, "key": key}


def test_gpu_overlay_requests_a_gpu_and_the_gpu_image() -> None:
    objects = render("gpu")
    embedder = workloads(objects)["embedder"]["spec"]["template"]["spec"]["containers"][0]
    assert embedder["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert embedder["image"].startswith("lookalike-embedder-gpu:")
    assert "nvidia.com/gpu" not in str(workloads(render("cpu"))["embedder"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_providers_come_from_the_image_alone(overlay: str) -> None:
    """The embedder stays NOT_SERVING when a requested provider is missing, so a pod asking for one its
    image lacks restarts forever: no manifest names providers, and each image asks only for what it ships."""
    for config in (o for o in render(overlay) if o["kind"] == "ConfigMap"):
        assert "LOOKALIKE_EMBEDDER_PROVIDERS" not in config.get("data", {}), overlay


def test_the_gpu_image_asks_only_for_providers_it_ships() -> None:
    text = (DEPLOY / "docker" / "embedder-gpu.Dockerfile").read_text()
    providers = re.search(r"LOOKALIKE_EMBEDDER_PROVIDERS=(\S+)", text).group(1).split(",")
    assert providers == ["cuda", "cpu"]
    installs = " ".join(re.findall(r"^RUN .*$", text, flags=re.MULTILINE)).lower()
    assert "tensorrt" not in installs, "TensorRT installed: then the image may ask for it"


# The CUDA major each pinned onnxruntime-gpu release links, read with `readelf -d` from its
# libonnxruntime_providers_cuda.so (1.31.1: libcudart.so.13, libcublas.so.13, libcublasLt.so.13). A new pin
# adds its own line, read the same way.
ONNXRUNTIME_GPU_CUDA_MAJOR = {"1.31.1": 13}


def test_the_gpu_image_pins_an_onnxruntime_gpu_built_for_its_cuda() -> None:
    """onnxruntime-gpu on a base image of another CUDA major cannot load its CUDA provider, and the embedder
    then stays NOT_SERVING: the pinned release and the base image's CUDA must agree."""
    text = (DEPLOY / "docker" / "embedder-gpu.Dockerfile").read_text()
    cuda_major = int(re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-", text, re.MULTILINE).group(1))
    pinned = re.search(r"^ARG ONNXRUNTIME_GPU=(\S+)$", text, re.MULTILINE).group(1)
    assert ONNXRUNTIME_GPU_CUDA_MAJOR.get(pinned) == cuda_major, (pinned, cuda_major)
    assert '"onnxruntime-gpu==${ONNXRUNTIME_GPU}"' in text


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_an_hpa_scales_carries_no_replicas(overlay: str) -> None:
    objects = render(overlay)
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        scaled = next(o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"])
        assert "replicas" not in scaled["spec"], f"{overlay}: {target['name']} would be reset on every apply"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_drain_before_sigterm_and_probes_have_time(overlay: str) -> None:
    for name, workload in workloads(render(overlay)).items():
        if not name.startswith(("embedder", "searcher")):
            continue
        spec = workload["spec"]["template"]["spec"]
        container = spec["containers"][0]
        delay = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert delay > 0 and spec["terminationGracePeriodSeconds"] > delay + 10, name
        # The drain after SIGTERM gets what the pod's grace leaves after preStop, less a few seconds to exit
        # (the searcher's final snapshot needs more), so in-flight calls are not cut short by a small setting.
        config = config_of(render(overlay), name)
        drain = float(next(value for key, value in config.items() if key.endswith("_GRACE_SECONDS")))
        exit_time = 60 if name.startswith("searcher") else 5
        assert drain >= 15 and delay + drain + exit_time <= spec["terminationGracePeriodSeconds"], (overlay, name)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["timeoutSeconds"] >= 2, f"{overlay}: {name} {probe}"


TLS_OVERLAYS = [overlay for overlay in OVERLAYS if overlay.endswith("tls")]


def secret_mount(workload: dict, secret: str) -> tuple[dict, dict]:
    """The volume of `secret` in a workload's pods and the server container's one mount of it."""
    spec, name = workload["spec"]["template"]["spec"], workload["metadata"]["name"]
    volumes = [v for v in spec["volumes"] if v.get("secret", {}).get("secretName") == secret]
    assert len(volumes) == 1, f"{name}: {len(volumes)} volumes of the Secret {secret}"
    volume = volumes[0]
    mounts = [m for m in spec["containers"][0].get("volumeMounts", []) if m["name"] == volume["name"]]
    assert len(mounts) == 1, f"{name}: {len(mounts)} mounts of the Secret {secret}"
    return volume, mounts[0]


TLS_COMPONENT = DEPLOY / "components" / "tls"


# replicated-dev: the component added to another replicated overlay, listed after replicated-searchers.
@pytest.mark.parametrize("overlay", TLS_OVERLAYS + ["replicated-dev"])
def test_tls_overlay_mounts_the_secrets_and_serves_plain_health_for_probes(overlay: str, tmp_path: Path) -> None:
    """Every server, the embedder and each searcher (every replica group in a replicated overlay), serves
    TLS with the Secret's files and requires tokens: one workload left out would serve plaintext."""
    added = overlay not in TLS_OVERLAYS
    objects = render(overlay_with(tmp_path, overlay, components=[TLS_COMPONENT]) if added else overlay)
    pods = servers(objects)
    assert {pod_labels(w)["app.kubernetes.io/name"] for w in pods.values()} == {"embedder", "searcher"}
    assert set(searchers(objects)) == ({f"searcher-{g}" for g in GROUPS} if overlay in REPLICATED else {"searcher"})
    for name, workload in pods.items():
        config_key = "LOOKALIKE_" + pod_labels(workload)["app.kubernetes.io/name"].upper()
        config = config_of(objects, name)
        spec = workload["spec"]["template"]["spec"]
        for secret in ("lookalike-tls", "lookalike-auth-tokens"):
            volume, mount = secret_mount(workload, secret)
            # No Secret: the pod waits, never serves without TLS or without auth.
            assert volume["secret"].get("optional", False) is False, (name, secret)
            assert mount.get("readOnly") is True, (name, secret)
            # A subPath mount never sees a rotated Secret (a renewed certificate, a new token list); the
            # servers re-read the files when they change.
            assert "subPath" not in mount and "subPathExpr" not in mount, (name, secret)
        volume, mount = secret_mount(workload, "lookalike-tls")
        files = {item["key"]: item["path"] for item in volume["secret"].get("items", [])} or {
            "tls.crt": "tls.crt", "tls.key": "tls.key"}
        assert config[f"{config_key}_TLS_CERT"] == os.path.join(mount["mountPath"], files["tls.crt"]), name
        assert config[f"{config_key}_TLS_KEY"] == os.path.join(mount["mountPath"], files["tls.key"]), name
        # Token auth on: the server reads the tokens file from the Secret lookalike-auth-tokens, key `tokens`.
        volume, mount = secret_mount(workload, "lookalike-auth-tokens")
        files = {item["key"]: item["path"] for item in volume["secret"].get("items", [])} or {"tokens": "tokens"}
        assert config[f"{config_key}_AUTH_TOKENS"] == os.path.join(mount["mountPath"], files["tokens"]), name
        # Kubelet's grpc probes speak no TLS: every probe asks the plaintext health-only port.
        health_port = int(config[f"{config_key}_HEALTH_ADDRESS"].rpartition(":")[2])
        container = spec["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == health_port, (name, probe)


def test_the_replicated_tls_certificate_names_are_documented() -> None:
    """A TLS client checks the certificate against the name it dials: the shard map hands clients each
    group's advertised name, so deploy/README.md must list every one for lookalike-tls."""
    objects = render("replicated-tls")
    readme = (DEPLOY / "README.md").read_text()
    for statefulset in searchers(objects).values():
        env = {e["name"]: e for e in statefulset["spec"]["template"]["spec"]["containers"][0]["env"]}
        advertise = env["LOOKALIKE_SEARCHER_ADVERTISE"]["value"].replace("$(POD_NAMESPACE)",
                                                                         statefulset["metadata"]["namespace"])
        host = re.fullmatch(r"dns:///([^:]+):\d+", advertise)[1]
        assert f"`{host}`" in readme, f"deploy/README.md does not name {host} for the certificate"
    for service in ("embedder", "embedder-headless"):
        namespace = named(objects, "Service", service)["metadata"]["namespace"]
        assert f"`{service}.{namespace}.svc.cluster.local`" in readme, f"deploy/README.md does not name {service}"


DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))


def base_images(text: str) -> list[str]:
    """A Dockerfile's FROM images, each ${ARG} replaced by its default."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.MULTILINE))
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: args[m[1]], base)
            for base in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_invariants(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = base_images(text)
    for base in bases:
        assert ":" in base and not base.endswith(":latest"), f"{dockerfile.name}: unpinned base {base}"
    # One base for every stage (one ARG): the venv copied from the build stage needs the same Python.
    assert len(set(bases)) == 1, f"{dockerfile.name}: stages on different bases {bases}"
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
        assert "third_party/hnswlib/build_wheel.py" in text, "the image runs hnswlib as `make` builds it"


@pytest.mark.parametrize("dockerfile", [d for d in DOCKERFILES if d.name != "model.Dockerfile"], ids=lambda p: p.name)
def test_what_a_service_image_copies_builds_the_package(dockerfile: Path, tmp_path: Path) -> None:
    """The source tree each service image copies into /src builds the lookalike wheel (setuptools refuses a
    package folder that pyproject maps and the image left out). Docker itself cannot run here."""
    source = tmp_path / "src"
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile.read_text(), flags=re.MULTILINE):
        *paths, destination = line.split()
        if not destination.startswith("/src"):
            continue
        target = source / destination.removeprefix("/src").strip("/")
        for path in paths:
            copied = target / Path(path).name if destination.endswith("/") else target
            copied.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (ROOT / path).is_dir() else shutil.copy)(ROOT / path, copied)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheels"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert [wheel.name.split("-")[0] for wheel in (tmp_path / "wheels").glob("*.whl")] == ["lookalike"]


def test_gpu_image_installs_onnxruntime_gpu_not_the_cpu_build() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0] for d in extras["embedder-gpu"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert "[embedder-gpu]" in (DEPLOY / "docker" / "embedder-gpu.Dockerfile").read_text()


@pytest.mark.parametrize("overlay", FIRST_RELEASES)
def test_embedder_connections_age_and_a_headless_service_lists_every_pod(overlay: str) -> None:
    """gRPC connections last for ever: without an age, pods the HPA adds get nothing from existing clients."""
    objects = render(overlay)
    assert float(config_of(objects, "embedder")["LOOKALIKE_EMBEDDER_MAX_CONNECTION_AGE_SECONDS"]) > 0
    headless = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "embedder-headless")
    pods = workloads(objects)["embedder"]["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= pods.items()


def test_a_second_release_selects_only_its_own_pods() -> None:
    """Blue/green: each Service, workload and PodDisruptionBudget of one release selects none of the other's
    pods, so a Service never mixes two models and no pod falls under two budgets (which blocks drains)."""
    releases = [render("cpu"), render("green")]
    pods = [[o["spec"]["template"]["metadata"]["labels"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
            for objects in releases]

    def selectors(objects: list[dict]) -> list[tuple[str, dict]]:
        found = []
        for o in objects:
            spec = o.get("spec", {})
            if o["kind"] == "Service":
                found.append((o["metadata"]["name"], spec["selector"]))
            elif o["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
                found.append((o["metadata"]["name"], spec["selector"]["matchLabels"]))
        return found

    for own, other in ((0, 1), (1, 0)):
        for name, selector in selectors(releases[own]):
            assert any(selector.items() <= labels.items() for labels in pods[own]), f"{name} selects nothing"
            assert not any(selector.items() <= labels.items() for labels in pods[other]), f"{name} selects the other release"
    assert {o["metadata"]["name"] for o in releases[1]} & {o["metadata"]["name"] for o in releases[0]} == set()


def test_the_build_context_leaves_out_the_checkout_s_own_state() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "var", "build", "tests"} <= ignored
    for dockerfile in DOCKERFILES:  # nothing a Dockerfile copies may be ignored
        copied = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile.read_text(), flags=re.MULTILINE)
        for source in " ".join(copied).split():
            assert source not in ignored, f"{dockerfile.name} copies {source}, which .dockerignore leaves out"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servers_spread_over_nodes_and_zones(overlay: str) -> None:
    for name, workload in workloads(render(overlay)).items():
        if not name.startswith(("embedder", "searcher")):
            continue
        template = workload["spec"]["template"]
        spread = {c["topologyKey"]: c for c in template["spec"]["topologySpreadConstraints"]}
        assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= set(spread), f"{overlay}: {name}"
        for constraint in spread.values():  # each counts only its own release's (and group's) pods
            assert constraint["labelSelector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_is_open_to_labelled_client_pods_here_and_in_labelled_namespaces(overlay: str) -> None:
    """Client pods need lookalike.io/client=true and nothing else: no release or group label may leak into
    the policy's client selectors (that would lock every client out)."""
    policy = next(o for o in render(overlay) if o["kind"] == "NetworkPolicy")
    grpc_rule = next(rule for rule in policy["spec"]["ingress"] if {"port": 50051, "protocol": "TCP"} in rule["ports"])
    assert grpc_rule["from"] == [
        {"podSelector": {"matchLabels": {"lookalike.io/client": "true"}}},
        {"namespaceSelector": {"matchLabels": {"lookalike.io/clients": "true"}},
         "podSelector": {"matchLabels": {"lookalike.io/client": "true"}}}]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_maps_are_generated_so_a_change_rolls_the_pods(overlay: str) -> None:
    """A ConfigMap changed in place reaches running pods only when they happen to restart. Generated ones
    carry a hash of their contents in their name, and kustomize rewrites every reference to it, so a change
    is a new pod template: a rolling update. Every reference must therefore name a rendered, hashed one."""
    objects = render(overlay)
    configs = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    referenced = set()
    for name, workload in workloads(objects).items():
        refs = config_refs(workload)
        assert refs <= configs, f"{overlay}: {name} names ConfigMaps that are not rendered: {refs - configs}"
        referenced |= refs
    for name in configs:
        assert re.fullmatch(r".+-[a-z0-9]{10}", name), f"{overlay}: ConfigMap {name} is not generated (no hash)"
    assert configs == referenced, f"{overlay}: ConfigMaps no pod reads: {configs - referenced}"
    for server in servers(objects):
        assert config_of(objects, server)


def test_a_config_change_renames_the_config_map(tmp_path: Path) -> None:
    before = render("cpu")
    changed = overlay_with(tmp_path, "cpu", configMapGenerator=[
        {"name": "embedder", "behavior": "merge", "literals": ["LOOKALIKE_EMBEDDER_MAX_BATCH=16"]}])
    after = render(changed)
    assert config_of(after, "embedder")["LOOKALIKE_EMBEDDER_MAX_BATCH"] == "16"
    assert config_of(before, "embedder")["LOOKALIKE_EMBEDDER_MAX_BATCH"] != "16"
    old, new = workloads(before), workloads(after)
    assert config_refs(new["embedder"]) != config_refs(old["embedder"]), "same pod template: no rollout"
    assert config_refs(new["searcher"]) == config_refs(old["searcher"]), "an unchanged config must not roll"


SERVICE_MONITOR = DEPLOY / "components" / "servicemonitor"


def matches(selector: dict, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against an object's labels."""
    tests = {"In": lambda key, values: labels.get(key) in values,
             "NotIn": lambda key, values: labels.get(key) not in values,
             "Exists": lambda key, values: key in labels,
             "DoesNotExist": lambda key, values: key not in labels}
    return (selector.get("matchLabels", {}).items() <= labels.items()
            and all(tests[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", [])))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_monitor_scrapes_every_server_pod_once(overlay: str, tmp_path: Path) -> None:
    """components/servicemonitor added to any overlay: its ServiceMonitor selects, by the labels they
    really carry (the release label included), Services with the port it names, and through them every
    server pod exactly once (twice would double every counter in a sum)."""
    objects = render(overlay_with(tmp_path, overlay, components=[SERVICE_MONITOR]))
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 1
    monitor = monitors[0]
    embedder = next(s for s in objects if s["kind"] == "Service" and not s["spec"].get("clusterIP")
                    and s["metadata"]["labels"]["app.kubernetes.io/name"] == "embedder")
    release = embedder["metadata"]["labels"]["app.kubernetes.io/instance"]
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == release
    # Named after its release: a second release in the namespace (green) gets its own, not this one replaced.
    assert monitor["metadata"]["name"] == release
    assert monitor["metadata"].get("namespace") == embedder["metadata"].get("namespace")
    assert "namespaceSelector" not in monitor["spec"], "the release's own namespace only"
    ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])
    scraped = [s for s in objects if s["kind"] == "Service"
               and matches(monitor["spec"]["selector"], s["metadata"]["labels"])
               and ports & {p.get("name") for p in s["spec"]["ports"]}]
    pods = servers(objects)
    assert {pod_labels(w)["app.kubernetes.io/name"] for w in pods.values()} == {"embedder", "searcher"}
    for name, workload in pods.items():
        via = [s for s in scraped if selects(s["spec"]["selector"], pod_labels(workload))]
        assert len(via) == 1, f"{overlay}: {name} is scraped through {[s['metadata']['name'] for s in via]}"
        port = next(p for p in via[0]["spec"]["ports"] if p.get("name") in ports)
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert {"name": port["targetPort"], "containerPort": 9100} in container["ports"], f"{overlay}: {name}"
    for service in scraped:
        assert any(selects(service["spec"]["selector"], pod_labels(w)) for w in pods.values()), service


# Base images take patch releases: a floating minor tag (python:3.11-slim-bookworm, postgres:15-bookworm,
# busybox:1.37) gets the upstream patch and Debian security releases at every rebuild (images) or restart
# (postgres), while a frozen patch tag (python:3.11.7-slim-bookworm, postgres:15.10-bookworm) silently ages
# without them. Reproducible builds pin a digest instead (deploy/README.md), which passes: 3.11-...@sha256:.
# The CloudNativePG Cluster's image (ghcr.io/cloudnative-pg/postgresql:15.10) is not an image a pod pulls
# itself: the operator rolls a minor update over its instances (replicas first, then a switchover) when the
# name changes, so it stays pinned (test_cnpg_cluster).
FROZEN_TAGS = {"python": r"\d+\.\d+\.\d+", "postgres": r"\d+\.\d+", "busybox": r"\d+\.\d+\.\d+"}


def frozen(image: str) -> bool:
    name, _, tag = image.split("@")[0].rpartition(":")
    if "/" in tag:  # registry:port/name, no tag
        return False
    pattern = FROZEN_TAGS.get(name.rsplit("/", 1)[-1])
    return bool(pattern and re.match(pattern + r"(-|$)", tag))


def test_frozen_tags_are_recognised() -> None:
    assert frozen("python:3.11.7-slim-bookworm") and frozen("docker.io/library/postgres:15.10")
    assert frozen("busybox:1.37.0")
    assert not frozen("python:3.11-slim-bookworm") and not frozen("postgres:15-bookworm")
    assert not frozen("python:3.11-slim-bookworm@sha256:" + "0" * 64) and not frozen("busybox:1.37")


def test_no_base_image_is_frozen_at_a_patch_release() -> None:
    images = {f"{d.name}: {image}" for d in DOCKERFILES for image in base_images(d.read_text())}
    for overlay in OVERLAYS:
        for workload in workloads(render(overlay)).values():
            spec = workload["spec"]["template"]["spec"]
            images |= {f"{overlay}: {c['image']}" for c in spec.get("initContainers", []) + spec["containers"]}
    assert any("python:" in image for image in images) and any("postgres:" in image for image in images)
    assert not [image for image in images if frozen(image.split(": ")[1])]
