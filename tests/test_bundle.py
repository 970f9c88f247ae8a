"""The Executor Hub bundle: config.yml loads the executor with its endpoints and settings."""

from jina import Executor

from executor import TokenStreamingExecutor
from tests.conftest import ROOT


def test_config_yml_loads_the_streaming_executor(tiny_model_dir):
    executor = Executor.load_config(
        str(ROOT / "config.yml"), uses_with={"model": str(tiny_model_dir), "dtype": "float32", "max_running": 3}
    )
    try:
        assert isinstance(executor, TokenStreamingExecutor)
        assert {"/stream", "/generate"} <= set(executor.requests)
        assert executor.engine.config.max_running == 3
        assert executor.metas.name == "TokenStreamingExecutor"
    finally:
        executor.close()
