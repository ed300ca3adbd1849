"""The least a user-space proxy can do: a TCP byte pipe, for the proxy benchmark's floor.

    python -m saber_bench.perf.tcp_pipe --upstream HOST:PORT [--port 0]

Every client connection gets its own upstream connection and bytes are copied both ways as they
arrive, with no HTTP parsing, no decisions and no metrics. `saber_bench.perf.sidecar --floor` sends the
same load through it: what it adds to TTFT on a machine is what any proxy in its place would
add there (loopback hops, the event loop's wake-ups, CPU shared with the engine and the load),
so the sidecar's own cost is what it adds beyond this.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

from saber_sidecar.server import run_loop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.pending: list[bytes] | None = []  # what the client sent before upstream was connected
        self.upstream: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP server's connections are stream transports
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            upstream, _ = await asyncio.get_running_loop().create_connection(
                lambda: _Upstream(self), self.host, self.port)
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        for data in self.pending or ():
            upstream.write(data)
        self.pending = None

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            if self.pending is not None:
                self.pending.append(data)
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pending = None
        if self.upstream is not None:
            self.upstream.close()


async def serve(listen_host: str, listen_port: int, upstream: str) -> None:
    host, _, port = upstream.rpartition(":")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(host, int(port)), listen_host, listen_port)
    bound = server.sockets[0].getsockname()
    print(f"tcp pipe listening on http://{bound[0]}:{bound[1]} -> {upstream}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saber_bench.perf.tcp_pipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to copy bytes to and from")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: any free one)")
    opts = parser.parse_args(argv)
    try:
        run_loop(serve(opts.host, opts.port, opts.upstream))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
