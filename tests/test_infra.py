"""infra/: every manifest parses AND means something. Entrypoints name study files that exist
and validate, with arguments the real `hilomoe` parser accepts; image and Ray/MLflow versions
agree with pyproject.toml and with what is installed; ports and environment variables agree
between the manifests and with what the code reads; nothing listens on every interface without
authentication (Ray's token on every node and client, MLflow's basic-auth app), no secret value
is committed (Secrets and `.env` files are the user's, required variables fail loudly), MinIO
keeps its artifacts on a volume; the MLflow server command of the compose file runs for real
(on loopback, with SQLite and a local directory standing in for PostgreSQL and S3) and refuses
a request without a login."""

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


def interpolate(text: str, env: dict[str, str]) -> str:
    """What Docker Compose makes of `text` with the variables `env` (its `.env`): `${VAR}`,
    `${VAR:-default}`, `${VAR:?message}` (a KeyError naming VAR when unset or empty), `$$`."""
    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["name"], m["op"], m["arg"]
        value = env.get(name) or None
        if value is None and op == ":?":
            raise KeyError(name)
        return value if value is not None else (arg if op == ":-" else "")
    return re.sub(r"(?P<escaped>\$\$)|\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}",
                  one, text)


def compose_required() -> set[str]:
    """The variables the compose file cannot do without (`${VAR:?...}`)."""
    return set(re.findall(r"\$\{(\w+):\?", (INFRA / "mlflow" / "docker-compose.yaml").read_text()))


def env_example() -> dict[str, str]:
    """infra/mlflow/.env.example: the variables a user's `.env` sets (placeholders)."""
    lines = (INFRA / "mlflow" / ".env.example").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#"))


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
    # the packages of mlflow[auth] (the basic-auth app), in versions that MLflow accepts
    from importlib.metadata import requires

    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    auth = [Requirement(r) for r in requires("mlflow") if 'extra == "auth"' in r]
    assert auth
    for req in auth:
        pin = re.search(rf"\b{re.escape(req.name)}==(\S+)", dockerfile, re.I)
        assert pin and req.specifier.contains(pin.group(1)), req


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


def _read_by_code_ray_or_mlflow(name: str) -> bool:
    """Whether the project's code reads the variable `name`, or Ray's token authentication, or
    MLflow's client (its declared environment variables)."""
    import mlflow.environment_variables
    import ray

    code = "\n".join(p.read_text() for p in (REPO / "platform").rglob("*.py"))
    ray_dir = Path(ray.__file__).parent
    auth_files = [ray_dir / "exceptions.py",
                  *(ray_dir / "_private" / "authentication").glob("*.py")]
    ray_auth = "\n".join(p.read_text() for p in auth_files)
    return (f'"{name}"' in code or (name.startswith("RAY_AUTH_") and name in ray_auth)
            or isinstance(getattr(mlflow.environment_variables, name, None),
                          mlflow.environment_variables._EnvironmentVariable))


def test_ports_and_environment_agree_with_each_other_and_the_code():
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
        for name in env:  # every variable set for a Ray job is one something reads
            assert _read_by_code_ray_or_mlflow(name), name
    assert job_env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{port}"
    # compose: the same server, the same port
    compose = COMPOSE["services"]["mlflow"]
    assert [interpolate(p, {}) for p in compose["ports"]] == [f"127.0.0.1:{port}:{port}"]
    assert compose["command"][compose["command"].index("--port") + 1] == str(port)
    # Ray's ports: the head exposes the GCS the workers join and the job server clients use
    head = containers(k8s("RayCluster"))[0]
    exposed = {p["containerPort"] for p in head["ports"]}
    assert {6379, 8265} <= exposed
    assert "--port=6379" in CLUSTER["head_start_ray_commands"][-1]
    assert ":6379" in CLUSTER["worker_start_ray_commands"][-1]
    assert "--dashboard-port=8265" in CLUSTER["head_start_ray_commands"][-1]


def _documented_secrets() -> dict[str, set[str]]:
    """The Secrets infra/README.md tells the user to create: {name: its keys}, parsed from its
    `kubectl create secret generic NAME --from-literal=KEY=...` commands."""
    out = {}
    for line in (INFRA / "README.md").read_text().splitlines():
        if line.startswith("kubectl create secret generic "):
            name = line.split()[4]
            out[name] = set(re.findall(r"--from-literal=(\w+)=", line))
    return out


def _secret_refs() -> set[tuple[str, str]]:
    refs = set()
    for f in (INFRA / "k8s").glob("*.yaml"):
        for d in docs(f):
            envs = [c.get("env", []) for c in containers(d)]
            envs.append(d.get("spec", {}).get("autoscalerOptions", {}).get("env", []))
            for env in envs:
                for e in env:
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        refs.add((ref["name"], ref["key"]))
    return refs


def test_secrets_and_volumes_referenced_exist():
    # every Secret a container reads is one the README's commands create, with that key, and
    # every key they create is read (none forgotten, none stale)
    documented = _documented_secrets()
    assert {(n, k) for n, keys in documented.items() for k in keys} == _secret_refs()
    claim = k8s("PersistentVolumeClaim", "hilomoe-shared")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    for kind in ("RayCluster", "RayJob"):
        text = yaml.safe_dump(k8s(kind))
        assert "claimName: hilomoe-shared" in text and "mountPath: /mnt/shared" in text


def _mlflow_server() -> dict:
    return [c for c in containers(k8s("Deployment", "mlflow")) if c["name"] == "mlflow"][0]


SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|USERNAME|MC_HOST")


def test_no_secret_value_is_committed():
    """No Secret object and no literal secret in any manifest: Kubernetes containers take every
    secret from a Secret the user creates, compose from variables it requires (no default), so
    that a missing `.env` stops it; the database password is on no command line."""
    for f in INFRA.rglob("*.yaml"):
        kinds = [d.get("kind") for d in docs(f)] if f.parent.name == "k8s" else []
        assert "Secret" not in kinds, f
    for f in (INFRA / "k8s").glob("*.yaml"):
        for d in docs(f):
            for c in containers(d):
                from_secret = {e["name"] for e in c.get("env", [])
                               if "secretKeyRef" in e.get("valueFrom", {})}
                for e in c.get("env", []):
                    if SECRETISH.search(e["name"]) and e["name"] != "RAY_AUTH_MODE":
                        if "value" in e:  # only built from the container's secret variables
                            refs = re.findall(r"\$\((\w+)\)", e["value"])
                            assert refs and set(refs) <= from_secret, (f.name, e)
                        else:
                            assert e["name"] in from_secret, (f.name, e)
    for service, spec in COMPOSE["services"].items():
        for name, value in spec.get("environment", {}).items():
            if SECRETISH.search(name):
                assert re.fullmatch(r"(?:[^$]*\$\{\w+:\?[^}]*\})+[^$]*", value), (service, name)
    # a missing .env fails loudly: no secret has a default, and every required variable,
    # alone unset, stops compose
    text = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    defaulted = re.findall(r"\$\{(\w+):?-", text)
    assert defaulted and not [v for v in defaulted if SECRETISH.search(v)], defaulted
    example = env_example()
    assert compose_required() == set(example), "the .env example lists what compose requires"
    interpolate(text, example)
    for name in example:
        with pytest.raises(KeyError, match=name):
            interpolate(text, {k: v for k, v in example.items() if k != name})
    assert all(v.startswith("replace-me") or k.endswith("USERNAME") for k, v in example.items())
    assert ".env" in (REPO / ".gitignore").read_text().split()
    # the database password reaches libpq through PGPASSWORD, never a URI or a command line
    import configparser
    from urllib.parse import urlsplit

    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    uris = [ini["mlflow"]["database_uri"]]
    for args in (COMPOSE["services"]["mlflow"]["command"], _mlflow_server()["command"]):
        uris.append(args[args.index("--backend-store-uri") + 1])
    for uri in uris:
        assert urlsplit(uri).scheme == "postgresql" and urlsplit(uri).password is None, uri
    assert "PGPASSWORD" in COMPOSE["services"]["mlflow"]["environment"]
    assert _env(_mlflow_server()).keys() >= {"PGPASSWORD"}


def _ray_auth(env: list[dict]) -> tuple[str | None, tuple[str, str] | None]:
    """(RAY_AUTH_MODE, the Secret and key RAY_AUTH_TOKEN comes from) of a container's env."""
    by_name = {e["name"]: e for e in env}
    ref = by_name.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    return by_name.get("RAY_AUTH_MODE", {}).get("value"), (ref["name"], ref["key"]) if ref else None


def test_ray_token_authentication_is_on_for_every_node_and_the_job_submitter():
    for kind in ("RayCluster", "RayJob"):
        cs = containers(k8s(kind))
        assert len(cs) >= 2 + (kind == "RayJob")  # head, workers (and the RayJob's submitter)
        for c in cs:
            assert _ray_auth(c.get("env", [])) == ("token", ("hilomoe-ray-auth", "auth_token")), \
                (kind, c["name"])
    cluster = k8s("RayCluster")["spec"]
    if cluster.get("enableInTreeAutoscaling"):  # the autoscaler sidecar talks to the GCS
        assert _ray_auth(cluster["autoscalerOptions"]["env"]) == (
            "token", ("hilomoe-ray-auth", "auth_token"))
    job = k8s("RayJob")["spec"]
    assert containers(job["submitterPodTemplate"]) and not containers(
        job["submitterPodTemplate"])[0].get("command")  # KubeRay fills in `ray job submit`
    # ray up: every node's container gets the mode and a token file mounted from the launching
    # machine (outside the repo), never a token value in the file
    options = dict(o.split(" ", 1)[1].split("=", 1) for o in CLUSTER["docker"]["run_options"]
                   if o.startswith("--env "))
    assert options["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in options
    token_dir, token_file = options["RAY_AUTH_TOKEN_PATH"].rsplit("/", 1)
    local = CLUSTER["file_mounts"][token_dir]
    assert local.startswith("~/") and token_file == "auth_token"
    assert "~/.mlflow" in CLUSTER["file_mounts"]  # the nodes' MLflow login (credentials file)


def test_nothing_listens_on_every_interface_without_authentication():
    for kind in ("RayCluster", "RayJob"):
        doc = k8s(kind)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        head = spec["headGroupSpec"]
        if head["rayStartParams"].get("dashboard-host") == "0.0.0.0":
            assert _ray_auth(containers(head)[0]["env"])[0] == "token", kind
    if "0.0.0.0" in CLUSTER["head_start_ray_commands"][-1]:
        assert "--env RAY_AUTH_MODE=token" in CLUSTER["docker"]["run_options"]
    for args in (COMPOSE["services"]["mlflow"]["command"], _mlflow_server()["command"]):
        server = _server_args(args)
        if server[server.index("--host") + 1] == "0.0.0.0":
            assert server[server.index("--app-name") + 1] == "basic-auth"
        hosts = interpolate(server[server.index("--allowed-hosts") + 1], {})
        assert "*" not in hosts.split(","), hosts
    # compose publishes every port on loopback unless the user says otherwise
    for service, spec in COMPOSE["services"].items():
        for port in spec.get("ports", []):
            assert interpolate(port, {}).startswith("127.0.0.1:"), (service, port)
    # the image runs the basic-auth app with the committed configuration
    dockerfile = (INFRA / "mlflow" / "Dockerfile").read_text()
    copied = re.search(r"^COPY basic_auth.ini (\S+)$", dockerfile, re.M).group(1)
    assert re.search(rf"^ENV MLFLOW_AUTH_CONFIG_PATH={re.escape(copied)}$", dockerfile, re.M)


def test_minio_keeps_its_artifacts_on_a_persistent_volume():
    minio = k8s("Deployment", "mlflow-minio")
    pod = minio["spec"]["template"]["spec"]
    container = pod["containers"][0]
    data_dir = container["args"][container["args"].index("server") + 1]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == data_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = k8s("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    if claim["spec"]["accessModes"] == ["ReadWriteOnce"]:  # the old pod lets go of it first
        assert minio["spec"]["strategy"]["type"] == "Recreate"


def _server_args(command: list[str]) -> list[str]:
    return command[command.index("server") + 1:]


def test_compose_and_kubernetes_run_the_same_mlflow_server():
    compose = _server_args(COMPOSE["services"]["mlflow"]["command"])
    kube = _server_args(_mlflow_server()["command"])
    flags = lambda args: [a for a in args if a.startswith("--")]  # noqa: E731
    assert flags(compose) == flags(kube)
    for args in (compose, kube):
        assert args[args.index("--artifacts-destination") + 1] == "s3://mlflow/artifacts"
        assert args[args.index("--backend-store-uri") + 1].startswith("postgresql://")
        assert "--serve-artifacts" in args  # clients log artifacts without S3 credentials
    # the same service names, so the image's basic_auth.ini serves both
    for flag in ("--backend-store-uri", "--app-name"):
        assert compose[compose.index(flag) + 1] == kube[kube.index(flag) + 1]


def _request_status(url: str, auth: tuple[str, str] | None = None) -> int:
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization",
                       "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_the_compose_mlflow_server_command_runs_and_proxies_artifacts(tmp_path, monkeypatch):
    """The compose file's own `mlflow server` arguments and environment, with a `.env` of the
    test's own secrets, SQLite for PostgreSQL (in the image's basic_auth.ini too), a local
    directory for S3 and loopback for 0.0.0.0: the server starts with its admin user from the
    environment, refuses a request without a login (or with a wrong one) with 401, and a
    study's tracker logged in as the admin logs a run whose artifacts land in the artifacts
    destination through the server (no direct access to the store)."""
    import configparser
    import os
    import secrets
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
    dotenv = {name: secrets.token_hex(16) for name in env_example()}  # the user's .env
    env = {k: interpolate(v, dotenv)
           for k, v in COMPOSE["services"]["mlflow"]["environment"].items()
           if not k.startswith(("AWS_", "MLFLOW_S3", "PG"))}
    ini = configparser.ConfigParser()
    ini.read(INFRA / "mlflow" / "basic_auth.ini")
    ini["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'auth.db'}"
    with open(tmp_path / "basic_auth.ini", "w") as f:
        ini.write(f)
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")  # the image's ENV
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    admin = (dotenv["MLFLOW_AUTH_ADMIN_USERNAME"], dotenv["MLFLOW_AUTH_ADMIN_PASSWORD"])

    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:  # what the image installs for it
        pytest.fail("MLflow's basic-auth app needs Flask-WTF (mlflow[auth]): install it")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args],
                                env={**os.environ, **env}, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
        except RuntimeError as e:
            raise RuntimeError(f"{e}:\n{log.read_text(errors='replace')[-3000:]}") from None
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _request_status(search) == 401
        assert _request_status(search, (admin[0], "wrong-" + admin[1])) == 401
        assert _request_status(search, admin) == 200
        from hilomoe.tracking.runs import Tracker

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        tracker = Tracker("infra-check", url)
        tracker.start_study({"a": 1})
        tracker.start_trial("t1", {"x": 1}, {"x": 1})
        tracker.finish_trial("t1", {"valid_auc": 0.7}, record={"trial_id": "t1"})
        assert tracker.finish_study() is True
        stored = [p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
        assert {"config.json", "trial.json"} <= set(stored)
    finally:
        stop_mlflow_server(proc)


def test_local_cluster_refuses_a_too_small_object_store_in_one_sentence():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(REPO / "infra" / "local_cluster.py"),
                          "--object-store-mb", "10"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and not res.stdout
    assert res.stderr.strip().splitlines()[-1].endswith(
        "--object-store-mb must be at least 75 (MiB), got 10.")
    assert "Traceback" not in res.stderr
