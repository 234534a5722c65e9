"""The serving benchmarks' HTTP client: aiohttp, one keep-alive connection per concurrent request.

A load generator must not be what it measures. httpx's ``AsyncClient``, this client before, needed
84-85% of its core at 32 concurrent requests against ``eek serve --dtype int8`` on loopback (2-core AMD
EPYC, MiniLM-L6, one text a request): 172-192 requests/s with a p99 of 818-876 ms, while the server's
own p99 was 215-231 ms; the slow requests waited in httpcore's connection pool before their first byte
was written. aiohttp, against the same server in the same run: 272-276 requests/s, p99 244-253 ms, at
13% of its core; at 8 concurrent requests the two agree (``benchmarks/profiles/load_client_ab.py``,
``benchmarks/results/amd_epyc/load_client_cpu.md``; encode/httpx#3215 reports the same gap). vLLM's
serving benchmark sends its requests with aiohttp too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

INSTALL = "the serving benchmarks' load client needs aiohttp: pip install aiohttp"


class TransportError(Exception):
    """The connection failed or timed out: no answer to read (the server stopped or hung)."""


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self):
        return json.loads(self.body)


@contextlib.asynccontextmanager
async def session(url: str, concurrency: int, timeout: float = 120.0):
    """An aiohttp session on ``url`` (scheme, host and port) keeping up to ``concurrency`` connections open."""
    try:
        import aiohttp
    except ImportError as error:
        raise ImportError(INSTALL) from error
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as client:
        yield client


async def post_json(client, path: str, body) -> Answer:
    """``POST path`` with ``body`` as JSON; the whole answer read. Raises :class:`TransportError` where
    no answer comes (refused, reset, timed out)."""
    import aiohttp

    try:
        async with client.post(path, json=body) as response:
            payload = await response.read()
            headers = {name.lower(): value for name, value in response.headers.items()}
            return Answer(response.status, headers, payload)
    except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as error:
        raise TransportError(str(error) or type(error).__name__) from error
