"""What the executor serves (its `/info` endpoint): the model id, the context length and a fingerprint, which the
OpenAI API lists and checks requests against, and the chat template's tool syntax, in which it writes tools. Asked
once, when a route first needs it; every replica of the executor serves the same model."""

from __future__ import annotations

import asyncio
from typing import Any

from docarray import DocList

from gateway.openai_api import OpenAIError
from schemas import ModelInfoDocument

INFO_ENDPOINT = "/info"


class ModelInfo:
    """`served_name`: the gateway's optional `model_name`, an alias that replaces the executor's id in the API (as
    vLLM's --served-model-name); None serves the executor's id."""

    def __init__(self, streamer: Any, served_name: str | None = None) -> None:
        self.streamer = streamer
        self.served_name = served_name
        self._info: ModelInfoDocument | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> ModelInfoDocument:
        """The executor's info, with the served name; OpenAIError 503 while the executor cannot be asked."""
        async with self._lock:
            if self._info is None:
                self._info = await self._ask()
        return self._info

    async def _ask(self) -> ModelInfoDocument:
        try:
            async for docs in self.streamer.stream_docs(
                docs=DocList[ModelInfoDocument]([ModelInfoDocument()]),
                exec_endpoint=INFO_ENDPOINT,
                return_type=DocList[ModelInfoDocument],
            ):
                if len(docs):
                    info = ModelInfoDocument.parse_obj(docs[0].dict())
                    if self.served_name:
                        info.model = self.served_name
                    return info
        except Exception:  # the executor is unreachable or still starting: no detail of it goes to the client
            pass
        raise OpenAIError(503, "the model is not available yet: retry later", type="server_error", code="unavailable")

    async def name(self) -> str:
        """The id the model is served under (the executor is asked only when no alias is set)."""
        return self.served_name or (await self.get()).model

    async def check(self, requested: str | None) -> ModelInfoDocument:
        """The info, once the requested model (when one is named) is the one served: else 404 model_not_found."""
        info = await self.get()
        if requested is not None and requested != info.model:
            raise OpenAIError(404, f"the model {requested!r} does not exist: this service serves {info.model!r}",
                              param="model", code="model_not_found")
        return info
