"""A connection pool looks its host name up once for many new connections (``http.Resolved``), against a real
server on 127.0.0.1 reached as ``localhost``; what a refused connection raises is unchanged."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from pipeline.core.config import EndpointConfig
from pipeline.core.errors import ConnectError
from pipeline.edges.client import ChatClient
from pipeline.edges.http import ConnectionPool


async def _listening() -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_many_new_connections_share_one_lookup_of_the_name() -> None:
    server, port = await _listening()
    pool = ConnectionPool(URL(f"http://localhost:{port}/v1"), max_idle=64)
    try:
        connections = await asyncio.wait_for(asyncio.gather(*(pool.connect() for _ in range(32))), 10)
        assert pool.connects == 32 and pool.lookups == 1  # opened together: one lookup between them
        assert all(c.transport is not None and not c.transport.is_closing() for c in connections)
        await asyncio.wait_for(pool.connect(), 10)
        assert pool.lookups == 1  # and the next one, within RESOLVE_TTL_S, reuses it
    finally:
        pool.close()
        server.close()


async def test_an_ip_literal_is_never_looked_up() -> None:
    server, port = await _listening()
    pool = ConnectionPool(URL(f"http://127.0.0.1:{port}/v1"), max_idle=8)
    try:
        await asyncio.wait_for(asyncio.gather(pool.connect(), pool.connect()), 10)
        assert pool.connects == 2 and pool.lookups == 0
    finally:
        pool.close()
        server.close()


async def test_a_refused_connection_is_the_same_connect_error_and_the_name_is_looked_up_again() -> None:
    server, port = await _listening()
    server.close()
    await server.wait_closed()
    config = EndpointConfig(base_url=f"http://localhost:{port}/v1", api_key="sk-test",
                            timeout={"connect": 5, "first_byte": 5, "idle": 5, "total": 10})
    async with ChatClient(config) as client:
        for attempt in (1, 2):
            with pytest.raises(ConnectError, match=f"cannot connect to localhost:{port}: .*refused"):
                await client.stream_chat(b"{}")
            assert client._pool is not None and client._pool.lookups == attempt  # a failure keeps no addresses
