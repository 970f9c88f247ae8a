"""Kubernetes and docker-compose: deploy/export.py (the real `jina export` CLIs) on deploy/'s flows, offline, and
what the manifests it writes would run: the project's image in both roles, the flow's settings, reachable ports and
binds, probes, restart policies and the volume of the gateway's predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from jina.jaml.helper import complete_path
from jina.parsers import set_gateway_parser, set_pod_parser

from client import stream_documents
from executor.executor import EMBEDDED_ID
from gateway.prediction_store import SQLiteStore
from gateway.predictions import PredictionSettings
from harness import ROOT
from harness.dockerfile import image_layout
from harness.processes import JINA, free_port, port_open, stop_process_group
from harness.service import FRANCE, grpc_client
from lifecycle.cache import CACHE_ENV
from schemas import PromptDocument

IMAGE = "token-streaming-llm:latest"
K8S_FLOW = ROOT / "deploy" / "flow.yml"
COMPOSE_FLOW = ROOT / "deploy" / "flow-compose.yml"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# A proxy nobody listens on: any call the export makes to the Hub or Docker Hub fails at once instead of waiting
# on the network, so an export that needs one fails the test (Jina asks Docker Hub for its version tag and falls
# back to `master` on its own: that call is the one expected to fail).
DEAD_PROXY = "http://127.0.0.1:9"


def flow_file(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def jina_export(kind: str, flow: Path, output: Path) -> None:
    """deploy/export.py (`jina export <kind>`, then the probes and restart policies) as docs/operations.md runs it:
    from the repository root, with JINA_GATEWAY_IMAGE set."""
    env = {key: value for key, value in os.environ.items() if key.lower() not in ("no_proxy", "jina_log_level")}
    env.update({name: DEAD_PROXY for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")})
    env["JINA_GATEWAY_IMAGE"] = IMAGE
    result = subprocess.run(
        [sys.executable, "deploy/export.py", kind, str(flow), str(output)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def cli_args(args: list[str]) -> Namespace:
    """A container's `jina <role> ...` arguments as the jina CLI in the container parses them."""
    role, *rest = args
    assert role in ("executor", "gateway"), role
    return (set_gateway_parser() if role == "gateway" else set_pod_parser()).parse_args(rest)


def hosts(args: Namespace) -> set[str]:
    return set(args.host if isinstance(args.host, list) else [args.host])


def with_values(args: list[str], option: str, values: list[str]) -> list[str]:
    """`args` with the values that follow `option` replaced."""
    i = args.index(option)
    return [*args[: i + 1], *values, *args[i + 1 + len(values) :]]


# Kubernetes -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s(tmp_path_factory) -> dict[str, list[dict]]:
    """The manifests `jina export kubernetes deploy/flow.yml` writes: {deployment directory: its YAML documents}."""
    output = tmp_path_factory.mktemp("k8s")
    jina_export("kubernetes", K8S_FLOW, output)
    return {path.parent.name: list(yaml.safe_load_all(path.read_text())) for path in output.glob("*/*.yml")}


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, [d["metadata"]["name"] for d in docs if d["kind"] == kind]
    return found[0]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def service_ports(service: dict) -> set[int]:
    return {port["targetPort"] for port in service["spec"]["ports"]}


def test_kubernetes_writes_the_gateway_and_the_executor(k8s):
    assert set(k8s) == {"gateway", "llm"}


def test_kubernetes_executor_runs_the_image_with_the_flow_settings(k8s):
    executor = flow_file(K8S_FLOW)["executors"][0]
    deployment = one(k8s["llm"], "Deployment", "llm")
    assert deployment["spec"]["replicas"] == executor["replicas"] == 2
    pod = container(deployment)
    assert pod["image"] == IMAGE
    assert pod["command"] == ["jina"] and pod["args"][0] == "executor"
    args = cli_args(pod["args"])
    assert args.uses == "config.yml"  # the image's WORKDIR config, as its ENTRYPOINT
    assert args.uses_with == executor["uses_with"]
    assert args.uses_with["model"] == "embedded"
    assert not hosts(args) & LOOPBACK, args.host
    assert [p["containerPort"] for p in pod["ports"]] == args.port
    service = one(k8s["llm"], "Service", "llm")
    assert service["spec"]["selector"] == {"app": "llm"}
    assert set(args.port) | set(args.port_monitoring) <= service_ports(service)


def test_kubernetes_gateway_serves_grpc_and_http_from_the_image(k8s):
    gateway = flow_file(K8S_FLOW)["gateway"]
    docs = k8s["gateway"]
    pod = container(one(docs, "Deployment", "gateway"))
    assert pod["image"] == IMAGE
    assert pod["command"] == ["jina"] and pod["args"][0] == "gateway"
    args = cli_args(pod["args"])
    assert args.uses == "config.yml"
    assert args.uses_with == gateway["uses_with"]
    assert [protocol.name for protocol in args.protocol] == ["GRPC", "HTTP"]
    assert not hosts(args) & LOOPBACK, args.host
    # Jina's Kubernetes export chooses the ports (gRPC 8080, HTTP 8081), each behind its own Service.
    grpc_port, http_port = args.port
    assert (grpc_port, http_port) == (8080, 8081)
    assert [p["containerPort"] for p in pod["ports"]] == [grpc_port, http_port]
    assert grpc_port in service_ports(one(docs, "Service", "gateway"))
    assert service_ports(one(docs, "Service", "gateway-1-http")) == {http_port}
    assert all(s["spec"]["selector"] == {"app": "gateway"} for s in docs if s["kind"] == "Service")
    # The gateway reaches every executor replica through the executor's Service.
    executor_port = cli_args(container(one(k8s["llm"], "Deployment", "llm"))["args"]).port[0]
    assert json.loads(args.deployments_addresses) == {"llm": [f"grpc://llm.default.svc:{executor_port}"]}


def test_kubernetes_gateway_finds_its_own_config_in_the_image(k8s, tmp_path, monkeypatch):
    """Jina names a custom gateway's config `config.yml`, like the executor's at the WORKDIR root: the search paths
    must lead Jina's own lookup to deploy/gateway/config.yml (LLMGateway) and to the gateway's py_modules."""
    args = cli_args(container(one(k8s["gateway"], "Deployment", "gateway"))["args"])
    layout = image_layout(tmp_path)
    monkeypatch.chdir(layout)  # the container's working directory
    config = Path(complete_path(args.uses, args.extra_search_paths))
    assert config == layout / "deploy" / "gateway" / "config.yml"
    assert yaml.safe_load(config.read_text())["jtype"] == "LLMGateway"
    (module,) = args.py_modules
    assert Path(complete_path(module, args.extra_search_paths)) == layout / "gateway" / "__init__.py"


# docker-compose -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("compose") / "docker-compose.yml"
    jina_export("docker-compose", COMPOSE_FLOW, output)
    return yaml.safe_load(output.read_text())


def test_compose_gateway_publishes_grpc_12345_and_http_8080(compose):
    services = compose["services"]
    assert set(services) == {"gateway", "llm"}
    gateway = services["gateway"]
    assert gateway["image"] == IMAGE
    assert gateway["entrypoint"] == ["jina"] and gateway["command"][0] == "gateway"
    args = cli_args(gateway["command"])
    assert args.uses == "config.yml"
    assert args.uses_with == flow_file(COMPOSE_FLOW)["gateway"]["uses_with"]
    assert [protocol.name for protocol in args.protocol] == ["GRPC", "HTTP"]
    assert args.port == [12345, 8080]
    assert {"12345:12345", "8080:8080", "9090:9090"} <= set(gateway["ports"])
    assert not hosts(args) & LOOPBACK, args.host
    executor_port = cli_args(services["llm"]["command"]).port[0]
    assert json.loads(args.deployments_addresses) == {"llm": [f"llm:{executor_port}"]}


def test_compose_executor_runs_the_image_with_the_flow_settings(compose):
    executor = compose["services"]["llm"]
    assert executor["image"] == IMAGE
    assert executor["entrypoint"] == ["jina"] and executor["command"][0] == "executor"
    args = cli_args(executor["command"])
    assert args.uses == "config.yml"
    assert args.uses_with == flow_file(COMPOSE_FLOW)["executors"][0]["uses_with"]
    assert not hosts(args) & LOOPBACK, args.host
    assert executor["ports"] == ["9091:9091"]
    assert "volumes" not in executor  # no path of the exporting machine


def test_compose_services_publish_distinct_host_ports(compose):
    """docker-compose refuses to start a second container on a host port already published."""
    published = [
        mapping.split(":")[0] for service in compose["services"].values() for mapping in service.get("ports", [])
    ]
    assert len(published) == len(set(published)) == 4, published


def test_the_compose_flow_is_the_kubernetes_flow_on_one_replica():
    k8s_flow, compose_flow = flow_file(K8S_FLOW), flow_file(COMPOSE_FLOW)
    assert compose_flow["gateway"] == k8s_flow["gateway"]
    (k8s_executor,) = k8s_flow["executors"]
    (compose_executor,) = compose_flow["executors"]
    assert {k: v for k, v in k8s_executor.items() if k != "replicas"} == {
        k: v for k, v in compose_executor.items() if k != "disable_auto_volume"
    }


def test_the_deploy_flows_serve_the_settings_of_flow_yml():
    """Containers serve as `make serve` does: the same model, limits and shutdown timings."""
    served = flow_file(ROOT / "flow.yml")
    deployed = flow_file(K8S_FLOW)
    assert deployed["gateway"]["uses_with"] == served["gateway"]["uses_with"]
    assert deployed["executors"][0]["uses_with"] == served["executors"][0]["uses_with"]
    for key in ("protocol", "port"):
        assert deployed["gateway"][key] == served["gateway"][key], key


@pytest.mark.parametrize("name, setting", [("gateway", "drain_timeout_s"), ("llm", "shutdown_grace_s")])
def test_kubernetes_leaves_time_to_end_streams_on_shutdown(k8s, name, setting):
    """A deleted Pod gets terminationGracePeriodSeconds (30 s unless set), its preStop hook included, before SIGKILL:
    the gateway's drain and the executor's grace for running streams must fit in it."""
    deployment = one(k8s[name], "Deployment", name)
    grace = deployment["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    pod = container(deployment)
    pre_stop = pod["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[-1].startswith("sleep ")
    assert float(pre_stop[-1].split()[1]) + cli_args(pod["args"]).uses_with[setting] < grace


# The exported commands, run -------------------------------------------------------------------------------------


def start(args: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [str(JINA), *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so that stop_process_group ends its children too
            env={**os.environ, "JINA_LOG_LEVEL": "WARNING", **(env or {})},
        )


def log_tail(log: Path) -> str:
    """The end of a jina log without the table of arguments it opens with (which would fill the tail)."""
    lines = [line for line in log.read_text().splitlines() if not line.startswith(("│", "╭", "├", "╰"))]
    return "\n".join(lines)[-4000:]


def wait_ports(ports: list[int], processes: dict[str, tuple[subprocess.Popen, Path]], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(port_open(port) for port in ports):
        for name, (process, log) in processes.items():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start; log:\n{log_tail(log)}")
        time.sleep(0.25)


@pytest.fixture
def exported_service(k8s, tmp_path) -> Iterator[tuple[int, int]]:
    """The executor and gateway commands of the Kubernetes manifests, each in a directory laid out as the image's
    WORKDIR. Only the ports (free ones), the executor's address (loopback: there is no cluster DNS here) and the
    gateway's cache directory (its volume: a directory of the test) change."""
    layout = image_layout(tmp_path / "workdir")
    executor_args = container(one(k8s["llm"], "Deployment", "llm"))["args"]
    gateway_args = container(one(k8s["gateway"], "Deployment", "gateway"))["args"]
    executor_port, grpc_port, http_port = free_port(), free_port(), free_port()
    executor_args = with_values(executor_args, "--port", [str(executor_port)])
    executor_args = with_values(executor_args, "--port-monitoring", [str(free_port())])
    gateway_args = with_values(gateway_args, "--port", [str(grpc_port), str(http_port)])
    gateway_args = with_values(gateway_args, "--port-monitoring", [str(free_port())])
    addresses = json.dumps({"llm": [f"grpc://127.0.0.1:{executor_port}"]})
    gateway_args = with_values(gateway_args, "--deployments-addresses", [addresses])
    processes = {
        "executor": (start(executor_args, layout, tmp_path / "executor.log"), tmp_path / "executor.log"),
        "gateway": (start(gateway_args, layout, tmp_path / "gateway.log", {CACHE_ENV: str(tmp_path / "cache")}),
                    tmp_path / "gateway.log"),
    }
    try:
        wait_ports([executor_port, grpc_port, http_port], processes)
        yield grpc_port, http_port
    finally:
        for process, _ in processes.values():
            stop_process_group(process)


@pytest.mark.e2e
async def test_the_exported_commands_serve_a_stream(exported_service):
    grpc_port, http_port = exported_service
    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/models", timeout=10).read())
    # The HTTP routes of LLMGateway (Jina's own gateway has no /v1), naming the model by the executor's id.
    assert [model["id"] for model in models["data"]] == [EMBEDDED_ID]
    request = PromptDocument(prompt=FRANCE, max_tokens=8)
    docs = [doc async for doc in stream_documents(grpc_client(grpc_port), request)]
    last = docs[-1]
    assert last.finish_reason in ("eos", "length"), last.error
    assert 1 <= last.completion_tokens <= 8
    assert last.generated_text.strip()


def test_kubernetes_gateway_is_ready_only_while_its_executors_answer_and_restarted_only_when_dead(k8s):
    # /ready turns 503 while an executor is lost (tests/test_crash_recovery.py): the Service stops sending the
    # gateway requests. Liveness asks only whether the process accepts connections: a lost executor must not get
    # a healthy gateway restarted (and its predictions with it).
    pod = container(one(k8s["gateway"], "Deployment", "gateway"))
    http_port = cli_args(pod["args"]).port[1]
    assert pod["readinessProbe"]["httpGet"] == {"path": "/ready", "port": http_port}
    assert pod["livenessProbe"]["tcpSocket"] == {"port": http_port}
    startup = pod["startupProbe"]["exec"]["command"]  # Jina's: the gRPC health, SERVING once the executors answer
    assert startup[:3] == ["jina", "ping", "gateway"] and startup[3].startswith("grpc://"), startup


@pytest.mark.parametrize("name", ["gateway", "llm"])
def test_kubernetes_restarts_a_dead_container(k8s, name):
    spec = one(k8s[name], "Deployment", name)["spec"]["template"]["spec"]
    assert spec.get("restartPolicy", "Always") == "Always"
    assert "livenessProbe" in container(one(k8s[name], "Deployment", name))


def test_compose_restarts_a_crashed_container_and_checks_its_health(compose):
    for name, service in compose["services"].items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"].startswith(f"jina ping {'gateway' if name == 'gateway' else 'executor'}")


def store_file(args: Namespace, http_port: int, cache: str, monkeypatch) -> Path:
    """Where a gateway started with `args` and its cache directory at `cache` keeps its default prediction store."""
    monkeypatch.setenv(CACHE_ENV, cache)
    store = PredictionSettings.parse(args.uses_with.get("predictions")).make_store(http_port)
    assert isinstance(store, SQLiteStore)
    return store.path


def test_kubernetes_gateway_keeps_its_predictions_on_a_volume_that_outlives_its_container(k8s, monkeypatch):
    """A container restarted (its liveness probe failed, it crashed) starts on a fresh filesystem: the SQLite file
    must lie on a volume of the Pod, which the new container mounts again. The executor keeps the image's cache
    directory, where its converted model is."""
    deployment = one(k8s["gateway"], "Deployment", "gateway")
    pod = container(deployment)
    cache = {var["name"]: var.get("value") for var in pod["env"]}[CACHE_ENV]
    (mount,) = pod["volumeMounts"]
    assert mount["mountPath"] == cache
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume == {"name": mount["name"], "emptyDir": {}}  # as long as the Pod lives, across its restarts
    args = cli_args(pod["args"])
    assert store_file(args, args.port[1], cache, monkeypatch).is_relative_to(cache)
    executor = container(one(k8s["llm"], "Deployment", "llm"))
    assert CACHE_ENV not in {var["name"] for var in executor["env"]}


def test_compose_gateway_keeps_its_predictions_on_a_named_volume(compose, monkeypatch):
    """A named volume outlives the container (and `docker compose down`); the executor mounts nothing (above)."""
    gateway = compose["services"]["gateway"]
    cache = dict(item.split("=", 1) for item in gateway["environment"])[CACHE_ENV]
    (volume,) = gateway["volumes"]
    name, path = volume.split(":")
    assert path == cache
    assert name in compose["volumes"]  # declared: a named volume, not a directory of the host
    args = cli_args(gateway["command"])
    assert store_file(args, args.port[1], cache, monkeypatch).is_relative_to(cache)
