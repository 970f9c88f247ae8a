"""What the Executor Hub installs (`requirements.txt`) is what the service runs on, installable by a plain pip;
the test and lint tools come from `requirements-test.txt`, which `make install` installs on top, and the clients
that need a virtualenv of their own (LangChain) from `requirements-clients.txt`."""

from __future__ import annotations

from packaging.requirements import Requirement

from harness import ROOT

TEST_TOOLS = {"pytest", "pytest-asyncio", "hypothesis", "playwright", "ruff", "mypy", "openai", "replicate"}


def pinned(name: str) -> list[Requirement]:
    lines = [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def test_runtime_requirements_hold_no_local_build_and_no_test_tool():
    runtime = pinned("requirements.txt")
    assert not [str(r) for r in runtime if "+" in str(r.specifier)]  # e.g. torch's +cpu: not on PyPI
    assert not {r.name for r in runtime} & TEST_TOOLS


def test_test_requirements_add_the_tools_to_the_runtime_ones():
    assert (ROOT / "requirements-test.txt").read_text().splitlines()[1] == "-r requirements.txt"
    assert {r.name for r in pinned("requirements-test.txt")} >= TEST_TOOLS


def test_client_requirements_are_pinned_each_to_one_version():
    clients = pinned("requirements-clients.txt")
    assert {"langchain-openai", "langchain-core", "pydantic"} <= {r.name for r in clients}
    assert [str(r) for r in clients if len(r.specifier) != 1 or next(iter(r.specifier)).operator != "=="] == []
