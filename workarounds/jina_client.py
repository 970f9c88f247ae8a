"""Jina's gRPC client drops the call metadata of `stream_doc`.

`Client.stream_doc(..., metadata=(("authorization", "Bearer <key>"),))` is documented to pass metadata "or
authentication information in the server call", but jina 3.34's GRPCBaseClient._get_streaming_results takes it in
`**kwargs` and calls `stream_doc_endpoint(request, timeout)` without it: the server never sees it (measured: a
gateway requiring an API key answered UNAUTHENTICATED to a call that carried the right key). `install()` replaces
both with versions that send `metadata` with the call; everything else is Jina's code as it was.
tests/test_security.py proves it against a gateway that requires a key.
"""

from __future__ import annotations

from typing import Any

import grpc
from jina.clients.base.grpc import GRPCBaseClient
from jina.clients.helper import callback_exec
from jina.excepts import InternalNetworkError
from jina.proto import jina_pb2_grpc
from jina.serve.networking.utils import get_grpc_channel
from jina.types.request.data import SingleDocumentRequest

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"jina": ("3.34",)}
TEST = "tests/test_security.py -k grpc"


async def _stream_doc_endpoint(
    self: GRPCBaseClient, request: SingleDocumentRequest, timeout: float | None = None, metadata: Any = None
):
    async with get_grpc_channel(
        f"{self.args.host}:{self.args.port}",
        asyncio=True,
        tls=self.args.tls,
        aio_tracing_client_interceptors=self.aio_tracing_client_interceptors(),
    ) as channel:
        stub = jina_pb2_grpc.JinaSingleDocumentRequestRPCStub(channel)
        try:
            async for response in stub.stream_doc(request, timeout=timeout, metadata=metadata):
                callback_exec(response=response, logger=self.logger)
                yield response
        except (grpc.aio.AioRpcError, InternalNetworkError) as err:
            await self._handle_error_and_metadata(err)


async def _get_streaming_results(
    self: GRPCBaseClient, on: str, inputs: Any, parameters: Any = None, return_type: Any = None,
    timeout: float | None = None, **kwargs: Any,
):
    request = SingleDocumentRequest()
    request.header.exec_endpoint = on
    request.document_cls = inputs.__class__
    request.data.doc = inputs
    async for response in _stream_doc_endpoint(self, request, timeout, kwargs.get("metadata")):
        yield return_type.from_protobuf(response.document)


def install() -> None:
    """Make Jina's gRPC client send `stream_doc`'s metadata; calling it again changes nothing. Raises
    UnverifiedVersion on a jina it was not verified against."""
    require_verified(__name__, VERIFIED, TEST)
    GRPCBaseClient.stream_doc_endpoint = _stream_doc_endpoint
    GRPCBaseClient._get_streaming_results = _get_streaming_results
