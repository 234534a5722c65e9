"""The serving benchmarks' load client (earlyexit_kernels/bench/load_client.py), against a real aiohttp server on
127.0.0.1: an answer comes back whole with its headers' names in lower case, any status is the caller's to judge,
and a server that is not there is a TransportError, not an exception from deep in aiohttp."""

import asyncio
import socket

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the load client is aiohttp")
from aiohttp import web  # noqa: E402

from earlyexit_kernels.bench import load_client  # noqa: E402


async def _with_server(check):
    async def classify(request):
        body = await request.json()
        if not body.get("input"):
            return web.json_response({"error": "input is empty"}, status=422)
        return web.json_response({"data": body["input"]}, headers={"X-Total-Time": "7"})

    app = web.Application()
    app.router.add_post("/classify", classify)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        return await check(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_an_answer_comes_back_whole_with_lower_case_header_names_and_its_status():
    async def check(url):
        async with load_client.session(url, 4) as client:
            answers = await asyncio.gather(
                *(load_client.post_json(client, "/classify", {"input": [f"text {i}"]}) for i in range(8))
            )
            refused = await load_client.post_json(client, "/classify", {"input": []})
        return answers, refused

    answers, refused = asyncio.run(_with_server(check))
    assert [answer.json()["data"] for answer in answers] == [[f"text {i}"] for i in range(8)]
    assert all(answer.status == 200 and answer.headers["x-total-time"] == "7" for answer in answers)
    assert refused.status == 422 and refused.json() == {"error": "input is empty"}


def test_a_server_that_is_not_there_is_a_transport_error():
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def check():
        async with load_client.session(f"http://127.0.0.1:{port}", 1) as client:
            await load_client.post_json(client, "/classify", {"input": ["a"]})

    with pytest.raises(load_client.TransportError):
        asyncio.run(check())
