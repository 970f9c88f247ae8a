"""workarounds/: each workaround refuses a library version it was not verified against, with an error that says
what to do, and the entry points that install them fail to start on one instead of serving with it."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import pytest
import uvloop

from harness import ROOT
from harness.processes import free_port
from workarounds import (
    UnverifiedVersion,
    asyncio_signals,
    grpc_aio_poller,
    grpc_cancel,
    jina_gateway,
    jina_monitoring,
    jina_routing,
    jina_worker,
    torch_cpu_ops,
    uvicorn_protocols,
    versions,
)

WORKAROUNDS = [
    grpc_cancel, grpc_aio_poller, jina_gateway, jina_worker, asyncio_signals, jina_monitoring, uvicorn_protocols,
    torch_cpu_ops, jina_routing,
]


def seeing(monkeypatch, distribution: str, version: str) -> None:
    """Make the workarounds see `version` of `distribution` installed (and the real version of every other)."""
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: version if name == distribution else real(name))


@pytest.mark.parametrize("workaround", WORKAROUNDS, ids=lambda module: module.__name__)
def test_each_workaround_refuses_an_unverified_version_and_says_what_to_do(monkeypatch, workaround):
    for distribution, series in workaround.VERIFIED.items():
        newer = f"{int(series[-1].split('.')[0]) + 1}.0.0"
        seeing(monkeypatch, distribution, newer)
        with pytest.raises(UnverifiedVersion) as raised:
            workaround.install()
        known = ", ".join(f"{one}.x" for one in series)
        assert str(raised.value) == (
            f"{workaround.__name__} was verified against {distribution} {known}; {newer} is installed: "
            f"re-run {workaround.TEST} and extend VERIFIED"
        )
        monkeypatch.undo()


@pytest.mark.parametrize("workaround", WORKAROUNDS, ids=lambda module: module.__name__)
def test_each_workaround_accepts_the_pinned_versions_and_their_patch_releases(monkeypatch, workaround):
    workaround.install()  # as installed here: the pins of requirements.txt
    for distribution, series in workaround.VERIFIED.items():
        seeing(monkeypatch, distribution, f"{series[0]}.99")
    workaround.install()


def test_a_version_matches_its_series_only():
    assert versions.series_of("1.68.0", "1.68") and versions.series_of("1.68", "1.68")
    assert not versions.series_of("1.680.0", "1.68") and not versions.series_of("1.69.0", "1.68")


def test_the_client_refuses_an_unverified_grpcio_when_it_builds_a_client_not_when_imported(monkeypatch):
    seeing(monkeypatch, "grpcio", "1.70.0")
    import client

    with pytest.raises(UnverifiedVersion, match="workarounds.grpc_cancel was verified against grpcio 1.68.x; "
                                                 "1.70.0 is installed"):
        client.grpc_client()


def test_importing_the_client_patches_nothing():
    """Only grpc_client() installs grpc_cancel: a program that imports client for its schemas or helpers keeps
    grpc.aio as it is."""
    probe = (
        "from workarounds import grpc_cancel; import client; "
        "assert not grpc_cancel.installed(), 'import client patched grpc.aio'; "
        "client.grpc_client(); assert grpc_cancel.installed(), 'grpc_client() did not'"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, timeout=120)


async def test_the_end_of_the_worker_task_cancels_the_request_unless_its_stream_ended_first():
    cancelled: list[str] = []

    async def worker_call() -> None:
        await asyncio.sleep(0)

    dropped = asyncio.create_task(worker_call())  # a call whose generator Jina dropped at a `yield`
    jina_worker.cancel_when_task_ends(dropped, lambda: cancelled.append("dropped"))
    finished = asyncio.create_task(worker_call())  # a call whose stream ended normally
    stop_watching = jina_worker.cancel_when_task_ends(finished, lambda: cancelled.append("finished"))
    stop_watching()
    await asyncio.gather(dropped, finished)
    await asyncio.sleep(0)  # done callbacks run on the loop's next turn
    assert cancelled == ["dropped"]


def test_the_installed_sigterm_handler_is_found_and_run_and_a_loop_that_hides_it_is_named(caplog):
    ran: list[str] = []

    async def find_handler() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, ran.append, "jina's handler")
        try:
            handler = asyncio_signals.installed_handler(loop, signal.SIGTERM)
            assert handler is not None
            handler()
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    asyncio.run(find_handler())
    assert ran == ["jina's handler"]

    async def find_none() -> None:
        assert asyncio_signals.installed_handler(asyncio.get_running_loop(), signal.SIGTERM) is None

    uvloop.run(find_none())
    assert "no drain on SIGTERM" in caplog.text


# The entry points, started as Jina starts them (`jina executor`, `jina gateway`), with jina 3.35.0 seen by the
# workarounds: each must exit with the error rather than serve (or hang, as a flow whose executor cannot start).

UNVERIFIED_JINA = (
    "import sys; from workarounds import versions; real = versions.installed_version; "
    "versions.installed_version = lambda name: '3.35.0' if name == 'jina' else real(name); "
    "from jina_cli import main; sys.argv[0] = 'jina'; main()"
)


def run_unverified(args: list[str]) -> tuple[int, str]:
    """The exit status and output of `jina *args` in its own process group (killed if it outlives the test)."""
    env = {**os.environ, "COLUMNS": "400"}  # Jina's rich log wraps a traceback at the terminal's width
    process = subprocess.Popen(
        [sys.executable, "-c", UNVERIFIED_JINA, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, " ".join(re.sub(r"\x1b\[[0-9;]*m", "", output).split())


def test_the_executor_does_not_start_on_an_unverified_jina(tiny_model_dir):
    status, output = run_unverified(
        ["executor", "--uses", "config.yml", "--uses-with", f'{{"model": "{tiny_model_dir}"}}',
         "--port", str(free_port())]
    )
    assert status != 0, output[-2000:]
    assert "workarounds.jina_worker was verified against jina 3.34.x; 3.35.0 is installed" in output, output[-2000:]


def test_the_gateway_does_not_start_on_an_unverified_jina():
    status, output = run_unverified(
        ["gateway", "--uses", "LLMGateway", "--py-modules", str(ROOT / "gateway" / "__init__.py"),
         "--protocol", "grpc", "http", "--port", str(free_port()), str(free_port())]
    )
    assert status != 0, output[-2000:]
    assert "workarounds.jina_gateway was verified against jina 3.34.x; 3.35.0 is installed" in output, output[-2000:]
