"""Starting with a model that is not on this machine: no access to the Hugging Face hub, an error that says where the
model was looked for, and a `jina flow` that exits with a failure status leaving no process behind. And a flow
stopped while its executor is still loading the model takes the executor along."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants as hub_constants

from engine.loading import ModelNotFound, load_model
from harness import ROOT
from harness.processes import free_port, live_processes, started_flow, write_service_flow

MISSING_HUB_ID = "no-such-org/no-such-model"
EXIT_BOUND_S = 120  # a bound on a hang, not a timing: the failure itself comes as soon as the executor has imported


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Iterator[Path]:
    """An empty local Hugging Face cache of the test's own; any connection attempt fails the test."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    connections: list[object] = []

    def refuse(sock: socket.socket, address: object) -> None:
        connections.append(address)
        raise OSError(f"this test allows no connection, got one to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield cache
    assert connections == [], "the hub was reached for"


def test_a_hub_id_not_in_the_cache_fails_at_once_saying_where_it_was_looked_for(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFound) as error:
        load_model(MISSING_HUB_ID)
    message = str(error.value)
    assert f"model '{MISSING_HUB_ID}' was not found locally" in message
    assert f"no directory {tmp_path / MISSING_HUB_ID}" in message  # a relative directory of that name
    assert f"no {hub_cache / 'models--no-such-org--no-such-model'} in the Hugging Face cache" in message
    assert f"`hf download {MISSING_HUB_ID}`" in message


def test_a_missing_directory_fails_naming_the_directory_alone(hub_cache, tmp_path):
    missing = tmp_path / "models" / "gone"
    with pytest.raises(ModelNotFound) as error:
        load_model(str(missing))
    # An absolute path cannot be a hub id: the hub cache is not mentioned.
    assert str(error.value) == f"model '{missing}' was not found locally: no directory {missing}"


def test_a_hub_id_in_the_local_cache_loads_from_it_without_the_hub(hub_cache, tiny_model_dir):
    # The cache's layout, as `hf download` writes it: refs/main names the snapshot of the revision.
    repo = hub_cache / "models--test-org--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    loaded = load_model("test-org/tiny-llama", dtype="float32")
    assert loaded.name == "test-org/tiny-llama"
    assert loaded.model.config.num_hidden_layers == 2


def test_a_flow_of_a_model_not_found_exits_with_a_failure_status_and_no_process_left(tmp_path):
    cache = tmp_path / "hf-cache"  # the executor's own Hugging Face cache, empty: the log must name it
    cache.mkdir()
    executor = {"name": "llm", "uses": str(ROOT / "config.yml"), "uses_with": {"model": MISSING_HUB_ID}}
    flow_file = write_service_flow(tmp_path / "flow.yml", free_port(), free_port(), executor, "test-model")
    log_file = tmp_path / "flow.log"
    with started_flow(flow_file, log_file, env={"HF_HUB_CACHE": str(cache)}) as flow:
        returncode = flow.wait(timeout=EXIT_BOUND_S)
        still_running = live_processes(flow.pid)
    log = log_file.read_text()
    assert returncode != 0, log[-4000:]
    # Whole, on one line, whatever the width of Jina's console.
    assert f"model '{MISSING_HUB_ID}' was not found locally" in log, log[-4000:]
    assert f"no {cache / 'models--no-such-org--no-such-model'} in the Hugging Face cache" in log, log[-4000:]
    assert "couldn't connect" not in log
    assert still_running == []


def test_a_flow_stopped_while_its_executor_loads_leaves_no_process(tmp_path, tiny_model_dir):
    """SIGTERM to the `jina flow` process alone (as systemd or Kubernetes send it) while the executor is still in
    its constructor: the executor cannot drain yet, and must not stay behind."""
    gate_dir = tmp_path / "gate"  # the warm-up waits for a file that never comes: the constructor never returns
    gate_dir.mkdir()
    executor = {
        "name": "llm",
        "uses": str(ROOT / "tests" / "gated.yml"),
        "uses_with": {"model": str(tiny_model_dir), "dtype": "float32", "gate_dir": str(gate_dir)},
    }
    flow_file = write_service_flow(tmp_path / "flow.yml", free_port(), free_port(), executor, "test-model")
    with started_flow(flow_file, tmp_path / "flow.log") as flow:
        deadline = time.monotonic() + EXIT_BOUND_S
        while not (gate_dir / "warming").exists():
            assert flow.poll() is None and time.monotonic() < deadline, (tmp_path / "flow.log").read_text()[-4000:]
            time.sleep(0.1)
        os.kill(flow.pid, signal.SIGTERM)
        flow.wait(timeout=10)  # `jina flow` installs no SIGTERM handler while it starts: it dies at once
        while live_processes(flow.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live_processes(flow.pid) == []
