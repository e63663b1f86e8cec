"""In-memory stand-ins for libp2p streams, for driving handlers without a network."""

from __future__ import annotations


class MemoryStream:
    """The INetStream subset FramedStream uses, over one end of an in-memory stream pair."""

    def __init__(self, stream, peer: str | None = None):
        self.stream = stream
        self.muxed_conn = None
        self.remote_peer = peer  # what a direct channel carries: the client's peer id

    async def read(self, n=None):
        return await self.stream.receive_some(n)

    async def write(self, data):
        await self.stream.send_all(data)

    async def close(self):
        await self.stream.send_eof()

    async def reset(self):
        await self.stream.aclose()
