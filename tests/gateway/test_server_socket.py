"""The gateway's own listening socket: connections accepted on it send without Nagle.

With Nagle on, a response written as headers then body waited for the client's delayed
ACK before the body left: about 40 ms per request on a kept-alive connection.
"""

from __future__ import annotations

import asyncio
import socket

from tidings.gateway.server import bind_gateway


async def test_connections_accepted_by_the_gateway_socket_have_nagle_off() -> None:
    sock = bind_gateway("127.0.0.1", 0)
    nodelay: list[int] = []

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = writer.get_extra_info("socket")
        nodelay.append(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)  # as uvicorn serves it
    try:
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(200):
            if nodelay:
                break
            await asyncio.sleep(0.01)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert nodelay and nodelay[0] != 0
