"""Defaults live once: the engine's in EngineConfig, which the executor's signature (what Jina reads for
`uses_with`) takes them from; config.yml and the flows name an engine setting only to change it."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from engine import EngineConfig
from executor import TokenStreamingExecutor
from harness import ROOT

FLOWS = ["flow.yml", "deploy/flow.yml", "deploy/flow-compose.yml"]


def test_every_engine_setting_is_an_executor_setting_with_the_engine_default():
    parameters = inspect.signature(TokenStreamingExecutor.__init__).parameters
    for field in dataclasses.fields(EngineConfig):
        assert field.name in parameters, f"EngineConfig.{field.name} cannot be set through uses_with"
        assert parameters[field.name].default == field.default, field.name


@pytest.mark.parametrize("flow", FLOWS)
def test_no_flow_repeats_an_engine_default(flow):
    defaults = {field.name: field.default for field in dataclasses.fields(EngineConfig)}
    for executor in yaml.safe_load((ROOT / flow).read_text())["executors"]:
        repeated = {k: v for k, v in executor.get("uses_with", {}).items() if k in defaults and v == defaults[k]}
        assert not repeated, f"{flow} repeats EngineConfig's defaults {repeated}: leave them out"
