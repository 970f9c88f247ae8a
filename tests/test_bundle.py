"""The Executor Hub bundle: config.yml loads the executor with its endpoints and settings, `jina hub push .` finds
it and uploads what the Dockerfile needs (and no local artefacts), and the image installs the project."""

from __future__ import annotations

import re
import shutil
import tomllib
import zipfile
from pathlib import Path

import pathspec
import yaml
from hubble.executor.helper import archive_package, get_requirements_env_variables
from hubble.executor.hubapi import extract_executor_name
from jina import Executor

from engine import EngineConfig
from executor import TokenStreamingExecutor
from harness import ROOT
from harness.dockerfile import copy_instructions, dockerfile_instructions, image_layout

# What the Hub needs to build and describe the executor: its config, its build and its code.
BUNDLE = [
    "config.yml",
    "Dockerfile",
    "requirements.txt",
    "README.md",
    "executor/__init__.py",
    "executor/executor.py",
    "schemas/__init__.py",
]
# Local state a push must not upload: the virtualenvs, the converted model, benchmark logs, caches of test tools.
ARTEFACTS = [
    ".git/HEAD",
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    ".venv-clients/lib/python3.11/site-packages/langchain_core/__init__.py",
    ".cache/jina-token-streaming/SmolLM2-135M-Instruct/model.safetensors",
    "bench/logs/service.log",
    "tests/__pycache__/test_e2e.cpython-311-pytest-9.2.0.pyc",
    "executor/__pycache__/executor.cpython-311.pyc",
    ".pytest_cache/v/cache/nodeids",
    ".hypothesis/examples/0/1",
    ".ruff_cache/0.8.6/123",
    ".mypy_cache/3.11/cache.db",
    "jina_token_streaming.egg-info/PKG-INFO",
    "build/k8s/gateway/gateway.yml",
]
# The same kinds, as they would appear in an upload of this checkout.
ARTEFACT_DIRECTORIES = (
    ".git/", ".venv/", ".venv-clients/", ".cache/", ".pytest_cache/", ".hypothesis/", ".ruff_cache/", ".mypy_cache/",
    "build/",
    "bench/logs/",
)


def test_config_yml_loads_the_streaming_executor(tiny_model_dir):
    executor = Executor.load_config(
        str(ROOT / "config.yml"), uses_with={"model": str(tiny_model_dir), "dtype": "float32", "max_running": 3}
    )
    try:
        assert isinstance(executor, TokenStreamingExecutor)
        assert {"/stream", "/generate"} <= set(executor.requests)
        assert executor.engine.config == EngineConfig(max_running=3)  # the rest: EngineConfig's defaults
        assert executor.metas.name == "TokenStreamingExecutor"
    finally:
        executor.close()


# The Dockerfile, read as Docker reads it (harness.dockerfile) -------------------------------------------------


def copied_files() -> set[str]:
    """Every file of the build context that the Dockerfile copies, relative to the repository root."""
    files = set()
    for sources, _, _ in copy_instructions():
        for source in sources:
            origin = ROOT / source
            paths = [p for p in origin.rglob("*") if p.is_file()] if origin.is_dir() else [origin]
            files |= {
                p.relative_to(ROOT).as_posix() for p in paths if "__pycache__" not in p.parts and p.suffix != ".pyc"
            }
    return files


def test_the_image_installs_every_package_it_copies(tmp_path):
    """`import schemas` (and engine, executor, gateway) must work in a container from any directory: Jina imports the
    py_modules by path, and they import the project's packages by name."""
    layout = image_layout(tmp_path)
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {"schemas", "engine", "executor", "gateway"} <= set(packages)
    for package in packages:
        assert (layout / package / "__init__.py").is_file(), f"the image lacks the package {package}"
    # What only the tests and the benchmark use is neither installed nor copied.
    assert not {"harness", "tests", "bench"} & set(packages)
    assert not [name for name in ("harness", "tests", "bench") if (layout / name).exists()]
    assert (layout / "pyproject.toml").is_file()
    instructions = dockerfile_instructions()
    installs = [
        i
        for i, (keyword, arguments) in enumerate(instructions)
        if keyword == "RUN" and re.search(r"pip install\b[^&;]*\s(-e\s+)?\.(\s|$)", arguments)
    ]
    assert installs, "no RUN pip install of the project (`pip install .` or `-e .`)"
    last_copy = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "COPY")
    assert installs[-1] > last_copy, "the project is installed before all of its files are copied"


def test_the_image_runs_the_executor_from_its_config(tmp_path):
    """The Hub and `docker run` start the image's ENTRYPOINT in the WORKDIR: config.yml and its py_modules are there."""
    entrypoint = [keyword_args for keyword, keyword_args in dockerfile_instructions() if keyword == "ENTRYPOINT"]
    assert yaml.safe_load(entrypoint[-1]) == ["jina", "executor", "--uses", "config.yml"]
    layout = image_layout(tmp_path)
    config = yaml.safe_load((layout / "config.yml").read_text())
    assert config["jtype"] == "TokenStreamingExecutor"
    for module in config["py_modules"]:
        assert (layout / module).is_file(), module


def dockerignore() -> pathspec.PathSpec:
    """.dockerignore as Docker reads it: every pattern is anchored at the context root (`**` matches any depth)."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    anchored = [
        ("!" if p.startswith("!") else "") + ("" if p.lstrip("!").startswith(("**", "/")) else "/") + p.lstrip("!")
        for p in patterns
    ]
    return pathspec.PathSpec.from_lines("gitignore", anchored)


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_artefacts():
    ignored = dockerignore()
    copied = copied_files()
    assert not [name for name in copied if ignored.match_file(name)]
    # A .venv or a model cache in the context would be sent to the builder on every build.
    assert [name for name in ARTEFACTS if not ignored.match_file(name)] == []


# What `jina hub push .` does before it uploads ------------------------------------------------------------------


def archive_names(folder: Path) -> set[str]:
    """The files `jina hub push` would upload from `folder` (its own archiver, which reads the root .gitignore)."""
    return set(zipfile.ZipFile(archive_package(folder)).namelist())


def test_hub_push_finds_the_executor_and_needs_no_build_env():
    assert extract_executor_name(ROOT) == "TokenStreamingExecutor"
    # A `${VAR}` in requirements.txt would make a push demand --build-env.
    assert get_requirements_env_variables(ROOT / "requirements.txt") == []
    metas = yaml.safe_load((ROOT / "config.yml").read_text())["metas"]
    assert metas["name"] == "TokenStreamingExecutor"
    assert len(metas["description"].split()) > 10
    assert "llm" in metas["keywords"] and "streaming" in metas["keywords"]


def test_hub_archive_holds_what_the_hub_builds():
    """The Hub builds the Dockerfile from the upload alone: every file the Dockerfile copies must be in it."""
    names = archive_names(ROOT)
    assert set(BUNDLE) <= names
    copied = copied_files()
    assert {"deploy/gateway/config.yml", "gateway/__init__.py", "pyproject.toml"} <= copied
    assert copied <= names, sorted(copied - names)
    uploaded_artefacts = [
        name
        for name in names
        if name.startswith(ARTEFACT_DIRECTORIES) or "__pycache__/" in name or ".egg-info/" in name
    ]
    assert not uploaded_artefacts, uploaded_artefacts


def test_hub_archive_leaves_out_local_artefacts(tmp_path):
    """Independent of what lies in this checkout: a tree with every kind of artefact, under the repository's
    .gitignore (the only ignore file the Hub's archiver reads)."""
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    for name in BUNDLE + ARTEFACTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    names = archive_names(tmp_path)
    assert set(BUNDLE) <= names
    assert not names & set(ARTEFACTS), sorted(names & set(ARTEFACTS))
