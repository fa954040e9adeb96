"""The deployment manifests (infra/deploy/): each parses, matches its schema, and says what
the platform needs of it. Offline: the schemas are vendored in infra/deploy/schemas/
(infra/deploy/README.md says from where), so a broken manifest fails `make test`, not a
deploy."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from shared.settings import DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORTS, PROJECT_ROOT, Settings

DEPLOY = PROJECT_ROOT / "infra" / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
NATS_VALUES = DEPLOY / "nats-values.yaml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
COMPOSE_SCHEMA = DEPLOY / "schemas" / "compose-spec.json"
K8S_SCHEMAS = DEPLOY / "schemas" / "kubernetes" / "v1.33.0-local-strict"
PLACEHOLDER_SECRETS = K8S / "secrets.placeholder.yaml"
# Kubernetes objects kept beside the k8s/ folder (the tracing UI's).
OTHER_K8S = (DEPLOY / "jaeger-kubernetes.yaml",)

SERVICES = ("quota", "context", "render", "delivery")
REPLICATED = ("quota", "context", "delivery")  # two replicas each; render: one per GPU
NATS_NODES = ("nats-1", "nats-2", "nats-3")
# Variables the manifests set that are not Kiln settings: the deploy steps' own.
NOT_SETTINGS = {"KILN_QUOTA_DB_PASSWORD", "KILN_NATS_AUTH_CONF"}
# An environment variable whose value is a credential: never a literal in a manifest.
SECRET_NAME = re.compile(r"DATABASE_URL|SECRET|PASSWORD|TOKEN")
PASSWORD_IN_URL = re.compile(r"://[^/:@\s]+:([^@]+)@")


# -- loading ------------------------------------------------------------------------------


def documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_files() -> list[Path]:
    return [p for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]


def k8s_objects(paths: Iterable[Path]) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in paths for doc in documents(path)]


def object_id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.name}:{doc['kind']}/{doc['metadata']['name']}"


ALL_K8S = k8s_objects([*k8s_files(), *OTHER_K8S])


def manifests(kind: str) -> dict[str, dict[str, Any]]:
    """Kiln's own objects of `kind` (k8s/), by name."""
    return {doc["metadata"]["name"]: doc for _, doc in k8s_objects(k8s_files()) if doc["kind"] == kind}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


# -- schemas ------------------------------------------------------------------------------


@cache
def k8s_registry() -> Registry:
    """The shared definitions the per-kind schemas point at ($ref /api/_definitions.json)."""
    definitions = json.loads((K8S_SCHEMAS / "_definitions.json").read_text())
    return Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))


def k8s_validator(doc: dict[str, Any]) -> jsonschema.protocols.Validator:
    """The strict schema for the object's kind and API version (no unknown fields anywhere)."""
    group, _, version = doc["apiVersion"].rpartition("/")
    name = "-".join(part for part in (doc["kind"].lower(), group.split(".")[0], version) if part)
    path = K8S_SCHEMAS / f"{name}.json"
    assert path.exists(), f"no vendored schema for {doc['apiVersion']} {doc['kind']}: add {path.name}"
    schema = json.loads(path.read_text())
    return jsonschema.validators.validator_for(schema)(schema, registry=k8s_registry())


@cache
def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def problems(validator: jsonschema.protocols.Validator, doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


# -- every file parses and matches its schema ---------------------------------------------


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(DEPLOY.rglob("*.yaml")) if "schemas" not in p.parts],
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_manifest_parses(path: Path):
    assert documents(path), f"{path} holds no YAML document"


def test_the_vendored_schemas_are_valid_schemas():
    for path in [COMPOSE_SCHEMA, *sorted(K8S_SCHEMAS.glob("*.json"))]:
        schema = json.loads(path.read_text())
        jsonschema.validators.validator_for(schema).check_schema(schema)


def test_compose_matches_the_compose_spec():
    assert problems(compose_validator(), compose()) == []


@pytest.mark.parametrize("item", ALL_K8S, ids=object_id)
def test_each_kubernetes_object_matches_its_schema(item: tuple[Path, dict[str, Any]]):
    _, doc = item
    assert problems(k8s_validator(doc), doc) == []


_DELETE = object()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return change


@pytest.mark.parametrize(
    ("kind", "name", "change"),
    [
        ("Deployment", "render", _set("spec/selector", _DELETE)),
        ("Deployment", "render", _set("spec/replicas", "2")),
        ("Deployment", "quota", _set("spec/template/spec/containers/0/readinesProbe", {})),
        ("Deployment", "delivery", _set("spec/template/spec/containers/0/lifecycle/preStop/exec/command", "sleep 5")),
        ("PodDisruptionBudget", "render", _set("spec/maxUnavailable", [1])),
        ("Service", "delivery", _set("spec/ports/0/port", "eighty")),
    ],
    ids=["no selector", "replicas a string", "a misspelt field", "a command not a list", "a list", "a port name"],
)
def test_the_kubernetes_schemas_catch_a_broken_manifest(kind: str, name: str, change: Callable):
    """The check above has teeth: each of these edits makes it fail."""
    doc = copy.deepcopy(manifests(kind)[name])
    assert problems(k8s_validator(doc), doc) == []
    change(doc)
    assert problems(k8s_validator(doc), doc), f"the schema took a broken {kind} {name}"


@pytest.mark.parametrize(
    "change",
    [
        _set("services/quota/deploy/replicas", [2]),
        _set("services/render/deploy/resources/reservations/devices/0/capabilities", "gpu"),
        _set("services/delivery/healthchek", {"test": ["CMD", "true"]}),
        _set("services/nats-1/depends_on/keys/condition", "service_finished"),
    ],
    ids=["replicas a list", "capabilities not a list", "a misspelt field", "an unknown condition"],
)
def test_the_compose_schema_catches_a_broken_file(change: Callable):
    doc = copy.deepcopy(compose())
    change(doc)
    assert problems(compose_validator(), doc), "the compose spec took a broken compose.yaml"


def test_kustomization_lists_every_manifest_but_the_placeholders():
    (kustomization,) = documents(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert all((K8S / name).exists() for name in listed), listed
    assert listed == {p.name for p in k8s_files()} - {PLACEHOLDER_SECRETS.name}
    assert kustomization["namespace"] == "kiln"


# -- Kubernetes: what the platform needs --------------------------------------------------


def test_every_service_has_a_deployment_with_probes_resources_and_a_disruption_budget():
    deployments, budgets = manifests("Deployment"), manifests("PodDisruptionBudget")
    assert set(deployments) == set(SERVICES)
    for name, deployment in deployments.items():
        pod = container(deployment)
        assert pod["args"][0] == name, "the image's entrypoint runs the service its first argument names"
        assert pod["readinessProbe"] and pod["livenessProbe"], name
        assert {"cpu", "memory"} <= set(pod["resources"]["requests"]) and "memory" in pod["resources"]["limits"], name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        covering = [b for b in budgets.values() if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets select its pods"


def test_probes_ask_ports_the_container_serves():
    for name, deployment in manifests("Deployment").items():
        pod = container(deployment)
        ports = {p["name"]: p["containerPort"] for p in pod["ports"]}
        env = {e["name"]: e.get("value") for e in pod["env"]}
        assert ports["metrics"] == int(env["KILN_METRICS_PORT"]) == DEFAULT_METRICS_PORTS[name], name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if probe in pod:
                assert pod[probe]["httpGet"]["port"] in ports, f"{name} {probe}"


@pytest.mark.parametrize("name", REPLICATED)
def test_quota_context_and_delivery_run_two_replicas(name: str):
    deployment = manifests("Deployment")[name]
    assert deployment["spec"]["replicas"] == 2
    assert manifests("PodDisruptionBudget")[name]["spec"] == {
        "minAvailable": 1,
        "selector": deployment["spec"]["selector"],
    }


def test_render_is_one_pod_per_gpu_and_rolls_one_at_a_time():
    render = manifests("Deployment")["render"]
    spec, pod = render["spec"], container(render)
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert spec["minReadySeconds"] == 30
    assert manifests("PodDisruptionBudget")["render"]["spec"]["maxUnavailable"] == 1
    # The worker drains itself on SIGTERM; nothing routes to it, so no preStop sleep.
    assert "lifecycle" not in pod


def test_delivery_serves_http_behind_a_service_and_drains_before_stopping():
    delivery = manifests("Deployment")["delivery"]
    pod = container(delivery)
    command = pod["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and 5 <= int(command[1]) <= 10
    assert pod["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    http = next(p for p in pod["ports"] if p["name"] == "http")
    assert http["containerPort"] == DEFAULT_HTTP_PORT
    service = manifests("Service")["delivery"]
    assert service["spec"]["selector"].items() <= delivery["spec"]["template"]["metadata"]["labels"].items()
    assert any(p["targetPort"] == "http" for p in service["spec"]["ports"])


def test_kubernetes_credentials_come_from_secrets_and_every_secret_read_is_declared():
    declared = {s["metadata"]["name"]: set(s["stringData"]) for s in manifests("Secret").values()}
    assert all(s["metadata"]["annotations"]["kiln.dev/placeholder"] == "true" for s in manifests("Secret").values())
    pods = [*manifests("Deployment").values(), *manifests("Job").values()]
    for workload in pods:
        spec = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        for env in container(workload)["env"]:
            if SECRET_NAME.search(env["name"]):
                assert "value" not in env, f"{name}: {env['name']} is a literal; take it from a Secret"
                ref = env["valueFrom"]["secretKeyRef"]
                assert ref["key"] in declared[ref["name"]], f"{name}: {ref} is in no Secret"
            assert not PASSWORD_IN_URL.search(env.get("value", "")), f"{name}: a password in {env['name']}"
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                keys = {item["key"] for item in volume["secret"]["items"]}
                assert keys <= declared[volume["secret"]["secretName"]], f"{name}: {volume}"


def test_the_config_map_points_the_services_at_the_nats_cluster_with_r3_streams():
    data = manifests("ConfigMap")["kiln-config"]["data"]
    assert data["KILN_STREAM_REPLICAS"] == "3"
    assert data["KILN_NATS_URL"].startswith("nats://")
    assert data["KILN_METRICS_HOST"] == "0.0.0.0"


def test_the_nats_helm_values_make_a_three_node_jetstream_cluster_that_syncs_always():
    values = yaml.safe_load(NATS_VALUES.read_text())
    config = values["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    jetstream = config["jetstream"]
    assert jetstream["enabled"] and jetstream["fileStore"]["enabled"] and jetstream["fileStore"]["pvc"]["enabled"]
    assert jetstream["merge"]["sync_interval"] == "always"
    assert "kiln-auth.conf" in config["merge"].values()  # trusts Kiln's operator
    assert "KILN_STREAM_REPLICAS=3" in NATS_VALUES.read_text()


# -- compose: what the platform needs -----------------------------------------------------


def test_compose_runs_three_nats_nodes_in_one_jetstream_cluster_that_syncs_always():
    services = compose()["services"]
    for node in NATS_NODES:
        service = services[node]
        image, _, tag = service["image"].partition(":")
        assert image == "nats" and tuple(int(n) for n in tag.split("-")[0].split(".")[:2]) >= (2, 11)
        conf = _mounted_conf(service)
        text = conf.read_text()
        assert re.search(rf"^server_name: {node}$", text, re.M)
        assert re.search(r"^jetstream \{[^}]*^\s*sync_interval: always$", text, re.M | re.S), conf
        routes = set(re.findall(r"nats-route://([\w-]+):6222", text))
        assert routes == set(NATS_NODES), conf
        assert "nats" in service["networks"]["default"]["aliases"]
        assert service["healthcheck"]["test"]


def _mounted_conf(service: dict[str, Any]) -> Path:
    (mount,) = [v for v in service["volumes"] if v.split(":")[1] == "/etc/nats/nats.conf"]
    return (COMPOSE.parent / mount.split(":")[0]).resolve()


def test_compose_runs_postgres_a_tracing_ui_and_the_four_services_from_one_image():
    services = compose()["services"]
    assert services["postgres"]["image"].startswith("postgres:") and services["postgres"]["healthcheck"]
    assert services["jaeger"]["image"].startswith("jaegertracing/")
    images = {services[name]["image"] for name in (*SERVICES, "keys", "setup")}
    assert len(images) == 1, images
    builds = [services[name]["build"] for name in (*SERVICES, "keys", "setup")]
    assert all(build == builds[0] for build in builds) and builds[0]["context"] == "../.."
    assert (COMPOSE.parent / builds[0]["context"] / builds[0]["dockerfile"]).resolve() == DOCKERFILE
    for name in SERVICES:
        service = services[name]
        assert service["command"][0] == name
        assert service["healthcheck"]["test"], name
        assert service["environment"]["KILN_STREAM_REPLICAS"] == "3", name
        assert service["environment"]["KILN_NATS_CREDS"].endswith(f"/{name}.creds"), name
        assert service["environment"]["KILN_METRICS_PORT"] == str(DEFAULT_METRICS_PORTS[name]), name
        assert service["depends_on"]["setup"]["condition"] == "service_completed_successfully", name


@pytest.mark.parametrize("name", REPLICATED)
def test_compose_runs_two_replicas_of_quota_context_and_delivery(name: str):
    assert compose()["services"][name]["deploy"]["replicas"] == 2


def test_compose_reserves_a_gpu_for_render():
    render = compose()["services"]["render"]
    assert render["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert render["stop_grace_period"] == "120s"


def literal_credentials(services: dict[str, Any]) -> list[str]:
    """Credentials written into compose.yaml rather than taken from the environment."""
    found = []
    for name, service in services.items():
        for variable, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(variable) and not variable.endswith("_FILE") and "${" not in value:
                found.append(f"{name}: {variable}")  # (a *_FILE variable holds a path, not a secret)
            password = PASSWORD_IN_URL.search(value)
            if password and not password.group(1).startswith("${"):
                found.append(f"{name}: the password in {variable}")
    return found


def test_compose_takes_credentials_from_the_environment_not_the_file():
    assert literal_credentials(compose()["services"]) == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KILN_LINK_SECRET", "0123456789abcdef0123456789abcdef"),
        ("KILN_DATABASE_URL", "postgresql://kiln_quota:hunter2@postgres:5432/kiln"),
        ("KILN_NATS_URL", "nats://kiln:hunter2@nats:4222"),
    ],
)
def test_the_credentials_check_catches_a_literal(variable: str, value: str):
    services = copy.deepcopy(compose()["services"])
    services["quota"]["environment"][variable] = value
    assert literal_credentials(services)


# -- both: the image and the variables ----------------------------------------------------


def _kiln_variables() -> Iterator[tuple[str, str]]:
    for name, service in compose()["services"].items():
        for variable in service.get("environment") or {}:
            yield f"compose {name}", variable
    for _, doc in k8s_objects(k8s_files()):
        if doc["kind"] == "ConfigMap":
            yield from ((doc["metadata"]["name"], variable) for variable in doc["data"])
        if doc["kind"] in ("Deployment", "Job"):
            yield from ((doc["metadata"]["name"], e["name"]) for e in container(doc)["env"])


def test_every_kiln_variable_the_manifests_set_is_a_setting():
    known = {field.metadata["variable"] for field in dataclasses.fields(Settings)} | NOT_SETTINGS
    unknown = {(where, v) for where, v in _kiln_variables() if v.startswith("KILN_") and v not in known}
    assert not unknown, f"misspelt or removed settings: {sorted(unknown)}"


def _entrypoint() -> str:
    found = re.search(
        r"^COPY [^\n]*<<'EOF' /usr/local/bin/kiln-entrypoint\n(.*?)^EOF$", DOCKERFILE.read_text(), re.M | re.S
    )
    assert found, "the Dockerfile writes its entrypoint script with a heredoc"
    return found.group(1)


def test_the_dockerfile_builds_one_image_with_pinned_cpu_torch_then_kiln():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert re.search(r"^ARG TORCH_VERSION=2\.13\.0$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    torch = text.index('pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"')
    assert torch < text.index("pip install .")
    assert re.search(r'^ENTRYPOINT \["kiln-entrypoint"\]$', text, re.M)
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".kiln", ".git"} <= set(ignored)


def test_the_entrypoint_runs_each_service_by_name():
    script = _entrypoint()
    if shutil.which("sh"):
        subprocess.run(["sh", "-n"], input=script, text=True, check=True)
    cases = re.search(r"^\s*(\S+)\)\n\s*exec python -m \"services\.\$what\"", script, re.M)
    assert cases and set(cases.group(1).split("|")) == set(SERVICES)
    assert all((PROJECT_ROOT / "services" / name / "__main__.py").exists() for name in SERVICES)


def test_the_entrypoints_deploy_steps_exist():
    """`keys` and `setup` run infra/deploy_steps.py: a rename there breaks the image."""
    assert re.search(
        r'^\s*keys\|setup\)\n\s*#[^\n]*\n\s*exec python -m infra\.deploy_steps "\$what"', _entrypoint(), re.M
    )
    steps = importlib.import_module("infra.deploy_steps")
    assert callable(steps.keys) and callable(steps.setup)


@pytest.fixture
def nats_server() -> str:
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")
    if found is None:
        pytest.skip("no nats-server binary (the embedded extra) to check the configs with")
    return found


@pytest.mark.parametrize("node", NATS_NODES)
def test_nats_server_accepts_each_nodes_config(node: str, nats_server: str, tmp_path: Path):
    """`nats-server -t` parses the file as the server will (an unknown field or a bad
    sync_interval fails), with a stand-in for the auth include the keys step writes."""
    conf = _mounted_conf(compose()["services"][node])
    shutil.copy(conf, tmp_path / "nats.conf")
    (tmp_path / "kiln").mkdir()
    (tmp_path / "kiln" / "auth.conf").write_text("# made by `kiln-entrypoint keys`\n")
    checked = subprocess.run([nats_server, "-t", "-c", "nats.conf"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
