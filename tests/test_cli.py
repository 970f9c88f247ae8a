"""`python -m client`, as a person runs it: over gRPC or `--http` against a real flow, and a clear line when
nothing listens."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import ROOT
from harness.processes import free_port
from harness.service import stream_docs


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("transport", [[], ["--http"]], ids=["grpc", "http"])
async def test_the_cli_prints_the_answer_then_a_summary(tiny_service, transport):
    port = tiny_service.http_port if transport else tiny_service.grpc_port
    result = run_client("hello", "--max-tokens", "5", "--system", "Be brief.", "--port", str(port), *transport)
    assert result.returncode == 0, result.stderr
    docs = await stream_docs(tiny_service, max_tokens=5, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}])
    answer, summary = result.stdout.rsplit("\n", 2)[:2]
    assert answer == docs[-1].generated_text
    assert summary.startswith("[") and "time to first token" in summary and "finish:" in summary


@pytest.mark.parametrize("transport", [[], ["--http"]], ids=["grpc", "http"])
def test_a_dead_port_is_one_clear_line(transport):
    result = run_client("hello", "--port", str(free_port()), *transport)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "no service answers" in result.stderr and "Traceback" not in result.stderr
