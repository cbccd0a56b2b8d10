"""The codec server in a real browser (issue 14): the Temporal UI (the dev server's, 2.54) shows
an encrypted instance's input decoded to an operator who signed in at POST /codec/session, and
ciphertext to a browser without that cookie, whose decode requests the API refuses (401).

Headless Debian Chromium (/usr/bin/chromium) driven by Playwright; .ci/run installs Chromium.
Without it the test fails in CI and is skipped elsewhere."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import uvicorn
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from core.settings import Settings
from core.temporal import connect
from tests.support import binary, free_port, seed_database

pytestmark = pytest.mark.timeout(180)

CHROMIUM = Path("/usr/bin/chromium")
KEY = base64.b64encode(bytes(range(32))).decode()  # a test key, never a real one
CUSTOMER = "ACME Browser Ltd"

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium", pytrace=False)
    pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)", allow_module_level=True)


@pytest_asyncio.fixture
async def db_url(db_url: str) -> str:
    return await seed_database(db_url)


@pytest_asyncio.fixture(scope="module")
async def ui_server() -> AsyncIterator[tuple[WorkflowEnvironment, int]]:
    """A dev server of its own, with its Web UI on a free port."""
    ui_port = free_port()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"), ui=True, ui_port=ui_port
    )
    try:
        yield env, ui_port
    finally:
        await env.shutdown()


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test's loop keeps its signals
        yield


async def test_an_operator_reads_decoded_payloads_in_the_temporal_ui_and_others_do_not(
    ui_server: tuple[WorkflowEnvironment, int], db_url: str
) -> None:
    from playwright.async_api import async_playwright

    env, ui_port = ui_server
    ui = f"http://127.0.0.1:{ui_port}"
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    settings = Settings(
        database_url=db_url,
        temporal_address=env.client.service_client.config.target_host,
        temporal_ui_url=ui,
        payload_encryption=True,
        payload_keys=f"k1={KEY}",
        task_queue=f"ui-{uuid.uuid4()}",
    )
    client = await connect(settings)
    # an encrypted instance (no worker needed: its input is in the start event)
    wid = f"sales_order-UI{uuid.uuid4().hex[:8]}"
    await client.start_workflow(
        "SalesOrderWorkflow",
        {"order_no": wid, "customer": {"id": "CUST-7", "company_name": CUSTOMER}},
        id=wid,
        task_queue=settings.task_queue,
    )
    raw = await env.client.get_workflow_handle(wid).fetch_history()
    started = raw.events[0].workflow_execution_started_event_attributes
    assert started.input.payloads[0].metadata["encoding"] == b"binary/encrypted"
    assert CUSTOMER.encode() not in started.input.payloads[0].data  # ciphertext on the server

    server = _Server(
        uvicorn.Config(
            create_app(settings, temporal_client=client),
            host="127.0.0.1",
            port=api_port,
            log_config=None,
            lifespan="on",
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the API did not start"
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(base_url=api) as http:
            r = await http.post("/auth/token", data={"username": "ada", "password": "demo"})
            token = r.json()["access_token"]

        shown: dict[str, tuple[str, list[int]]] = {}
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            for who in ("operator", "anyone"):
                context = await browser.new_context()
                page = await context.new_page()
                if who == "operator":  # signs in once: an HttpOnly cookie for /codec
                    session = await page.request.post(
                        f"{api}/codec/session", headers={"Authorization": f"Bearer {token}"}
                    )
                    assert session.status == 204, await session.text()
                # the UI's codec settings, as the operator sets them once in the browser
                await page.goto(ui)
                await page.evaluate(
                    """endpoint => {
                        localStorage.setItem('endpoint', JSON.stringify(endpoint));
                        localStorage.setItem('includeCredentials', JSON.stringify(true));
                        localStorage.setItem('overrideRemoteCodecConfiguration', 'true');
                    }""",
                    f"{api}/codec",
                )
                decodes: list[int] = []
                page.on(
                    "response",
                    lambda r, seen=decodes: (
                        seen.append(r.status) if "/codec/decode" in r.url else None
                    ),
                )
                await page.goto(f"{ui}/namespaces/default/workflows/{wid}")
                if who == "operator":
                    await page.get_by_text(CUSTOMER).first.wait_for(timeout=30_000)
                else:
                    await (
                        page.locator("#content")
                        .get_by_text("Codec Server could not connect")
                        .wait_for(timeout=30_000)
                    )
                shown[who] = (await page.inner_text("body"), list(decodes))
                await context.close()
            await browser.close()
    finally:
        server.should_exit = True
        await serving

    operator_text, operator_decodes = shown["operator"]
    assert CUSTOMER in operator_text
    assert operator_decodes and set(operator_decodes) == {200}
    anyone_text, anyone_decodes = shown["anyone"]
    assert CUSTOMER not in anyone_text
    assert anyone_decodes and set(anyone_decodes) == {401}
