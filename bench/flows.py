"""Real `jina flow`s with Jina's plain gRPC gateway for the benchmark (the seed baseline; the service runs from
flow.yml itself, bench/service.py), each in its own process group, stopped even on error; and the gRPC stream the
load driver opens against a flow: each stream is its own `stream_doc` call, on its own gRPC channel."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from client import grpc_client, stream_documents
from harness.processes import free_port, running_flow, write_flow
from schemas import ModelOutputDocument, PromptDocument

ROOT = Path(__file__).resolve().parent.parent
LOGS = Path(__file__).resolve().parent / "logs"


class LogDirs:
    """What harness.service.serve needs of pytest's tmp_path_factory: a fresh directory under bench/logs."""

    def mktemp(self, name: str) -> Path:
        path = LOGS / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"
        path.mkdir(parents=True)
        return path


def seed_executor(device: str, dtype: str) -> dict:
    return {
        "name": "seed",
        "uses": "SeedStreamingExecutor",
        "py_modules": [str(ROOT / "bench" / "seed_executor.py")],
        "uses_with": {"model": "embedded", "device": device, "dtype": dtype},
    }


@contextmanager
def serving(name: str, executor: dict, timeout: float = 300) -> Iterator[int]:
    """A flow with a plain gRPC gateway on a free port; yields the port. Its log stays in bench/logs/."""
    LOGS.mkdir(exist_ok=True)
    port = free_port()
    flow_file = write_flow(LOGS / f"{name}.flow.yml", port, executor)
    with running_flow(flow_file, [port], LOGS / f"{name}.log", timeout=timeout):
        yield port


def grpc_stream(port: int):
    # Built once, outside the timed streams: a Jina Client holds only settings (every stream_doc call opens its
    # own gRPC channel), and building one costs 15-20 ms of Python. Built per stream, the last of 16 streams
    # opened at once in this one process started 200-250 ms after the first (measured), waiting on the others'
    # constructors: a cost of the load generator, which separate users on separate machines would not share.
    client = grpc_client("127.0.0.1", port)

    async def open_stream(prompt: str, max_tokens: int) -> AsyncIterator[ModelOutputDocument]:
        async for doc in stream_documents(client, PromptDocument(prompt=prompt, max_tokens=max_tokens)):
            yield doc

    return open_stream
