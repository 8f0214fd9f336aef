"""9P2000.L for sigpoll: a confined file server and an asyncio client.

* :class:`NinepServer` exports a directory over TCP, a unix socket or an fd pair (the
  kernel's ``trans=fd``), with flush(5) semantics done right: an aborted request gets
  no reply, a completed one is answered before its Rflush, every Tflush is answered.
* :class:`Client` speaks the same messages, turns task cancellation into Tflush, and
  never reuses a tag before its Rflush.
* :mod:`sigpoll.ninep._codec` is the pure codec both are built on.

Run a server with ``python -m sigpoll.ninep serve DIR --listen 127.0.0.1:5640``.
"""

from __future__ import annotations

from ._client import Client, File, NinepError, Stat
from ._codec import FramingError, MessageError, ProtocolError, Qid
from ._server import Limits, NinepServer

__all__ = [
    "Client",
    "File",
    "FramingError",
    "Limits",
    "MessageError",
    "NinepError",
    "NinepServer",
    "ProtocolError",
    "Qid",
    "Stat",
    "serve",
]


async def serve(root: str, host: str = "127.0.0.1", port: int = 5640, **options: object) -> None:
    """Serve ``root`` over TCP until cancelled (``options`` go to :class:`NinepServer`)."""
    import asyncio

    server = NinepServer(root, **options)  # type: ignore[arg-type]
    try:
        srv = await server.start_tcp(host, port)
        async with srv:
            await asyncio.Future()
    finally:
        await server.close()
