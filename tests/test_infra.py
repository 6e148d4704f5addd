"""infra/: every manifest parses AND means something. Entrypoints name study files that exist
and validate, with arguments the real `hilomoe` parser accepts; image and Ray/MLflow versions
agree with pyproject.toml and with what is installed; ports and environment variables agree
between the manifests and with what the code reads; the MLflow server command of the compose
file runs for real (on loopback, with SQLite and a local directory standing in for PostgreSQL
and S3)."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from hilomoe.cli import build_parser
from hilomoe.study.spec import load_study, parse_study

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s(kind: str, name: str | None = None) -> dict:
    found = [d for f in sorted((INFRA / "k8s").glob("*.yaml")) for d in docs(f)
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def requirement(name: str) -> Requirement:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    return next(r for r in reqs if r.name == name)


def containers(doc: dict) -> list[dict]:
    """Every container of a Deployment, StatefulSet, Job, RayCluster or RayJob."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            if "containers" in node:
                out.extend(node["containers"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return out


CLUSTER = yaml.safe_load((INFRA / "ray" / "cluster.yaml").read_text())
COMPOSE = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
PROJECT_IMAGE = f"ghcr.io/hilomoe/hilomoe:{PYPROJECT['version']}"


def test_every_manifest_parses_and_every_kubernetes_object_is_complete():
    files = sorted(INFRA.rglob("*.yaml"))
    assert {f.relative_to(INFRA).as_posix() for f in files} >= {
        "ray/cluster.yaml", "k8s/raycluster.yaml", "k8s/rayjob.yaml", "k8s/mlflow.yaml",
        "k8s/storage.yaml", "mlflow/docker-compose.yaml"}
    for f in (INFRA / "k8s").glob("*.yaml"):
        for d in docs(f):
            assert {"apiVersion", "kind", "metadata"} <= d.keys(), f
            assert d["metadata"].get("name"), f


def test_the_cluster_launcher_config_passes_rays_own_schema():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    # what `ray up` does first: fill the provider's defaults, then check against the schema
    validate_config(prepare_config(copy.deepcopy(CLUSTER)))
    head = CLUSTER["available_node_types"][CLUSTER["head_node_type"]]
    gpu = CLUSTER["available_node_types"]["gpu_worker"]
    assert head["resources"].get("GPU", 0) == 0 and gpu["resources"]["GPU"] >= 1
    assert gpu["min_workers"] == 0 < gpu["max_workers"]  # autoscaled from zero


def test_images_and_versions_agree_with_pyproject_and_what_is_installed():
    import mlflow
    import ray

    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$",
                     (INFRA / "Dockerfile").read_text(), re.M)
    ray_version, py = base.group(1), f"{base.group(2)}.{base.group(3)}"
    assert ray_version == ray.__version__
    assert requirement("ray").specifier.contains(ray_version)
    assert Requirement(f"python{PYPROJECT['requires-python']}").specifier.contains(py)
    torch_pin = re.search(r"torch==(\S+)", (INFRA / "Dockerfile").read_text()).group(1)
    assert requirement("torch").specifier.contains(torch_pin)
    for kind in ("RayCluster", "RayJob"):
        doc = k8s(kind)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray_version
        assert {c["image"] for c in containers(doc)} == {PROJECT_IMAGE}
    assert CLUSTER["docker"]["image"] == PROJECT_IMAGE

    ml = re.search(r"^FROM ghcr.io/mlflow/mlflow:v(\S+)$",
                   (INFRA / "mlflow" / "Dockerfile").read_text(), re.M).group(1)
    assert ml == mlflow.__version__ and requirement("mlflow").specifier.contains(ml)
    server = [c for c in containers(k8s("Deployment", "mlflow")) if c["name"] == "mlflow"][0]
    assert server["image"] == f"ghcr.io/hilomoe/mlflow:{ml}"
    assert COMPOSE["services"]["mlflow"]["build"] == "."  # built from that Dockerfile


def _study_commands() -> list[tuple[str, list[str]]]:
    """Every `hilomoe study run ...` an infra file runs or tells its reader to run."""
    found = []
    for f in sorted(INFRA.rglob("*.yaml")):
        text = f.read_text()
        # the commands comments tell a reader to run (a trailing backslash continues a line)
        for m in re.finditer(r"^#.*?hilomoe (study run [^\n]*?)(?:\\\n#\s*([^\n]*))?$", text,
                             re.M):
            line = m.group(1) + (" " + m.group(2) if m.group(2) else "")
            found.append((f.name, shlex.split(line)))
    job = k8s("RayJob")
    found.append(("rayjob entrypoint", shlex.split(job["spec"]["entrypoint"])[1:]))
    return found


@pytest.mark.parametrize("where,argv", _study_commands(), ids=lambda v: str(v)[:40])
def test_every_study_command_names_a_valid_study_with_valid_arguments(where, argv):
    args = build_parser().parse_args(argv)  # the real parser: unknown flags fail here
    study = load_study(REPO / args.study)  # exists and validates
    raw = study.model_dump(mode="json")
    for key in ("concurrency", "cpus_per_trial", "gpus_per_trial", "trials"):
        if getattr(args, key) is not None:
            raw["budget"][key] = getattr(args, key)
    parse_study(raw, where)
    assert args.out and args.out.startswith("/mnt/shared/"), "results on the shared volume"


def _env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_ports_and_environment_agree_with_each_other_and_the_code():
    code = "\n".join(p.read_text() for p in (REPO / "platform").rglob("*.py"))
    # the MLflow address Ray jobs use is the MLflow service, at the port the server listens on
    service = k8s("Service", "mlflow")
    server = [c for c in containers(k8s("Deployment", "mlflow")) if c["name"] == "mlflow"][0]
    port = int(server["command"][server["command"].index("--port") + 1])
    assert service["spec"]["ports"][0]["port"] == port == server["ports"][0]["containerPort"]
    assert server["readinessProbe"]["httpGet"]["port"] == port
    job_env = yaml.safe_load(k8s("RayJob")["spec"]["runtimeEnvYAML"])["env_vars"]
    ray_envs = [job_env] + [_env(c) for c in containers(k8s("RayCluster"))]
    ray_envs.append(dict(o.split(" ", 1)[1].split("=", 1) for o in CLUSTER["docker"]["run_options"]
                         if o.startswith("--env ")))
    for env in ray_envs:
        assert env["MLFLOW_TRACKING_URI"].endswith(f":{port}")
        assert env["HILOMOE_CACHE"].startswith("/mnt/shared/")
        for name in env:  # every variable set for a Ray job is one the code reads
            assert f'"{name}"' in code, name
    assert job_env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{port}"
    # compose: the same server, the same port
    compose = COMPOSE["services"]["mlflow"]
    assert compose["ports"] == [f"{port}:{port}"]
    assert compose["command"][compose["command"].index("--port") + 1] == str(port)
    # Ray's ports: the head exposes the GCS the workers join and the job server clients use
    head = containers(k8s("RayCluster"))[0]
    exposed = {p["containerPort"] for p in head["ports"]}
    assert {6379, 8265} <= exposed
    assert "--port=6379" in CLUSTER["head_start_ray_commands"][-1]
    assert ":6379" in CLUSTER["worker_start_ray_commands"][-1]
    assert "--dashboard-port=8265" in CLUSTER["head_start_ray_commands"][-1]


def test_secrets_and_volumes_referenced_exist():
    secret = k8s("Secret", "mlflow-secrets")
    for f in (INFRA / "k8s").glob("*.yaml"):
        for d in docs(f):
            for c in containers(d):
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == "mlflow-secrets"
                        assert ref["key"] in secret["stringData"], ref
    claim = k8s("PersistentVolumeClaim", "hilomoe-shared")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for kind in ("RayCluster", "RayJob"):
        text = yaml.safe_dump(k8s(kind))
        assert "claimName: hilomoe-shared" in text and "mountPath: /mnt/shared" in text
    # the server reads the password the command line interpolates
    server = [c for c in containers(k8s("Deployment", "mlflow")) if c["name"] == "mlflow"][0]
    assert "$(POSTGRES_PASSWORD)" in " ".join(server["command"])
    assert "POSTGRES_PASSWORD" in _env(server)


def _server_args(command: list[str]) -> list[str]:
    return command[command.index("server") + 1:]


def test_compose_and_kubernetes_run_the_same_mlflow_server():
    compose = _server_args(COMPOSE["services"]["mlflow"]["command"])
    server = [c for c in containers(k8s("Deployment", "mlflow")) if c["name"] == "mlflow"][0]
    kube = _server_args(server["command"])
    flags = lambda args: [a for a in args if a.startswith("--")]  # noqa: E731
    assert flags(compose) == flags(kube)
    for args in (compose, kube):
        assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow/artifacts"
        assert args[args.index("--backend-store-uri") + 1].startswith("postgresql://")
        assert "--serve-artifacts" in args  # clients log artifacts without S3 credentials


@pytest.mark.slow
def test_the_compose_mlflow_server_command_runs_and_proxies_artifacts(tmp_path):
    """The compose file's own `mlflow server` arguments, with SQLite for PostgreSQL, a local
    directory for S3 and loopback for 0.0.0.0: the server starts, and a study's tracker logs a
    run whose artifacts land in the artifacts destination through the server (no direct
    access to the store)."""
    import subprocess
    import sys

    from mlflow_server import free_port, stop_mlflow_server, wait_healthy

    args = _server_args(COMPOSE["services"]["mlflow"]["command"])
    port = free_port()
    swap = {"--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination": str(tmp_path / "artifacts"),
            "--host": "127.0.0.1", "--port": str(port), "--workers": "1",
            "--allowed-hosts": f"127.0.0.1:{port},localhost:{port}"}
    for flag, value in swap.items():
        args[args.index(flag) + 1] = value
    env = {k: v for k, v in COMPOSE["services"]["mlflow"]["environment"].items()
           if not k.startswith(("AWS_", "MLFLOW_S3"))}
    import os

    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        from hilomoe.study.tracking import Tracker

        tracker = Tracker("infra-check", url)
        tracker.start_study({"a": 1})
        tracker.start_trial("t1", {"x": 1}, {"x": 1})
        tracker.finish_trial("t1", {"valid_auc": 0.7}, record={"trial_id": "t1"})
        assert tracker.finish_study() is True
        stored = [p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
        assert {"config.json", "trial.json"} <= set(stored)
    finally:
        stop_mlflow_server(proc)
