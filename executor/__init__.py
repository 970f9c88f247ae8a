"""The Jina skin of the service. config.yml's py_modules imports this file by path, so everything it needs
comes through absolute imports of the installed project (make install puts it into .venv in editable mode)."""

from executor.executor import TokenStreamingExecutor

__all__ = ["TokenStreamingExecutor"]
