"""workarounds/grpc_cancel.py against a real grpc.aio server: a reader cancelled just as its call starts cancels the
call, so the server stops streaming (and the service's executor stops generating)."""

from __future__ import annotations

import asyncio

import grpc

from workarounds import grpc_cancel


async def test_a_reader_cancelled_as_its_call_starts_cancels_the_call():
    grpc_cancel.install()
    server_cancelled = asyncio.Event()

    async def handler(request: bytes, context: grpc.aio.ServicerContext):
        try:
            yield b"first"
            await asyncio.Event().wait()  # streams on until the client cancels
        except asyncio.CancelledError:
            server_cancelled.set()
            raise

    server = grpc.aio.server()
    methods = {"Stream": grpc.unary_stream_rpc_method_handler(handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("probe.Probe", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream("/probe.Probe/Stream")(b"")
            reader: asyncio.Task | None = None
            # The window, made certain: the call's start completes, and this callback, registered before the
            # reader awaits it, cancels the reader before the reader resumes.
            grpc_cancel.when_started(call, lambda: reader.cancel())
            reader = asyncio.create_task(anext(call.__aiter__()))
            await asyncio.gather(reader, return_exceptions=True)
            assert reader.cancelled()
            await asyncio.wait_for(server_cancelled.wait(), timeout=10)
            assert call.cancelled()
    finally:
        await server.stop(grace=None)
