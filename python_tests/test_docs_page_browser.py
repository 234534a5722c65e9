"""``/docs`` in a real browser: headless Chromium loads the page from a server on 127.0.0.1, Swagger UI renders
every route of the OpenAPI document, and one "Try it out" request runs and answers 200.

Driven over the Chrome DevTools Protocol (a websocket, the ``websockets`` package). Skipped, with the reason,
where Chromium (Debian's ``chromium``), ``websockets`` or Swagger UI's files (``swagger-ui-py``) are missing.
"""

import asyncio
import json
import re
import shutil
import subprocess
import time

import pytest
from served_models import RunningServer

pytest.importorskip("starlette", reason="the server needs starlette (the serve extra)")
pytest.importorskip("uvicorn", reason="the server needs uvicorn (the serve extra)")
pytest.importorskip("prometheus_client", reason="the server needs prometheus_client")
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx")
websockets = pytest.importorskip("websockets", reason="the browser is driven over a websocket (websockets)")
pytest.importorskip("swagger_ui", reason="/docs's files come from swagger-ui-py (the serve extra)")

from earlyexit_kernels.integrations.model_folder import load_model  # noqa: E402
from earlyexit_kernels.integrations.server import create_app  # noqa: E402
from earlyexit_kernels.integrations.server.openapi import ROUTES  # noqa: E402

BROWSER = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on this machine (Debian: apt install chromium)")

#: seconds the page has to render, and a request to answer
PATIENCE = 60


@pytest.fixture(scope="module")
def server(saved_classifier):
    model, tokenizer = load_model(saved_classifier)
    running = RunningServer(create_app(model, tokenizer, model_id=saved_classifier, max_batch_size=8))
    yield running
    running.close()


@pytest.fixture()
def browser(tmp_path):
    """Headless Chromium with its DevTools port, and the websocket URL of a fresh page."""
    process = subprocess.Popen(
        [
            BROWSER,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        deadline = time.monotonic() + PATIENCE
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(found.group(1)) if found else None
        if port is None:
            pytest.fail(f"Chromium did not open its DevTools port (exit status {process.poll()})")
        yield port
    finally:
        process.kill()
        process.wait(timeout=30)


async def _drive(port: int, url: str, steps: list[str]) -> list:
    """Open ``url`` in a new page, then evaluate each script of ``steps`` (awaiting its promise) in turn."""
    page = httpx.put(f"http://127.0.0.1:{port}/json/new?{url}", timeout=30).json()
    results = []
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2**24) as socket:
        number = 0
        for script in steps:
            for _ in range(20):
                number += 1
                await socket.send(
                    json.dumps(
                        {
                            "id": number,
                            "method": "Runtime.evaluate",
                            "params": {"expression": script, "awaitPromise": True, "returnByValue": True},
                        }
                    )
                )
                while True:
                    message = json.loads(await asyncio.wait_for(socket.recv(), PATIENCE + 30))
                    if message.get("id") == number:
                        break
                # the first steps can meet the blank page's context, gone as the page navigates: ask again
                if "destroyed" not in str(message.get("error", "")):
                    break
                await asyncio.sleep(0.2)
            if "error" in message:
                raise AssertionError(f"step {len(results) + 1}: the browser refused it: {message['error']}")
            result = message["result"]
            if "exceptionDetails" in result:
                raise AssertionError(f"step {len(results) + 1} failed in the page: {result['exceptionDetails']}")
            results.append(result["result"].get("value"))
    return results


#: resolves with what ``probe`` returns once it returns something truthy (polled every 100 ms), else rejects
WAIT_FOR = """
new Promise((resolve, reject) => {
  const started = Date.now();
  const poll = () => {
    let value;
    try { value = (PROBE)(); } catch (error) { value = null; }
    if (value) { resolve(value); return; }
    if (Date.now() - started > PATIENCE_MS) { reject(new Error('timed out waiting for: ' + WHAT)); return; }
    setTimeout(poll, 100);
  };
  poll();
})
"""


def wait_for(probe: str, what: str) -> str:
    return (
        WAIT_FOR.replace("PROBE", probe).replace("PATIENCE_MS", str(PATIENCE * 1000)).replace("WHAT", json.dumps(what))
    )


def test_swagger_ui_renders_every_route_and_runs_a_try_it_out_request(server, browser):
    rendered_paths = wait_for(
        "() => { const found = [...document.querySelectorAll('.opblock-summary-path')]"
        ".map(e => e.getAttribute('data-path') || e.textContent.trim()); return found.length ? found : null; }",
        "the operations",
    )
    version_error = "() => document.body.innerText"
    # the summary's button (not the block around it) opens an operation
    open_health = wait_for(
        "() => { const b = document.querySelector('#operations-default-get_health .opblock-summary-control');"
        " if (b) { b.click(); return true; } return null; }",
        "GET /health's operation",
    )
    # the page starts in "Try it out" mode (tryItOutEnabled): the button reads Cancel and Execute is there already
    try_it_out = wait_for(
        "() => { if (document.querySelector('.opblock.is-open .execute')) return true; "
        "const b = document.querySelector('.opblock.is-open .try-out__btn'); if (b) { b.click(); } return null; }",
        "Try it out",
    )
    execute = wait_for(
        "() => { const b = [...document.querySelectorAll('.opblock.is-open .execute')][0]; "
        "if (b) { b.click(); return true; } return null; }",
        "the Execute button",
    )
    answered = wait_for(
        "() => { const cell = document.querySelector('.opblock.is-open .live-responses-table tbody .response-col_status');"
        " return cell && cell.textContent.trim() ? cell.textContent.trim() : null; }",
        "the answer",
    )
    paths, body, _, _, _, status = asyncio.run(
        _drive(
            browser, server.url + "/docs", [rendered_paths, version_error, open_health, try_it_out, execute, answered]
        )
    )
    assert "does not specify a valid version field" not in body
    documented = {path for _, path, _ in ROUTES}
    shown = {path.replace("\u200b", "") for path in paths}
    assert documented <= shown, f"Swagger UI did not render {sorted(documented - shown)}"
    assert status.startswith("200"), f"Try it out on GET /health answered {status}"
