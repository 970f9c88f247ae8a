"""LangChain's `with_structured_output` and `bind_tools`, unchanged, against a real flow on the embedded model: run
from .venv-clients (`make test` builds it from requirements-clients.txt), as LangChain 1.x needs pydantic 2
and the service's venv holds jina's pydantic 1."""

from __future__ import annotations

import json
import subprocess

import pytest

from harness import ROOT

pytestmark = pytest.mark.e2e
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"


def test_langchain_gets_typed_answers_and_tool_calls(embedded_service):
    run = subprocess.run([str(CLIENTS_PYTHON), str(ROOT / "tests" / "langchain_client.py"),
                          f"{embedded_service.url}/v1", "test-model"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    for method in ("json_schema", "function_calling"):
        answer = results[method]
        assert answer["type"] == "City" and answer["name"] and answer["country"], method
    for calls in (results["bind_tools"], results["bind_tools_streamed"]):
        assert [call["name"] for call in calls] == ["get_weather"]
        assert set(calls[0]["args"]) == {"city"} and calls[0]["id"].startswith("call_")
    assert results["bind_tools_streamed"][0]["args"] == results["bind_tools"][0]["args"]
    after = results["after_tool_result"]
    assert after["content"] or after["tool_calls"]  # auto: the model chooses; either is a valid answer
