"""Payload encryption (issue 14): the AES-GCM codec, its key ring and settings, a sales order run
with the codec on (ciphertext in the history, which replays), the codec server behind
authentication, and the dev server's UI pointed at it by scripts/run_stack.py."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.history.v1 import History
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from api.app import create_app
from api.routers.codec import COOKIE
from api.security import create_access_token
from core.codec import (
    ENCODING,
    KEY_ID,
    EncryptionCodec,
    PayloadDecryptionError,
    PayloadKeyError,
    parse_keys,
)
from core.settings import Settings
from core.temporal import data_converter, register_search_attributes
from scripts import run_stack
from tests.support import binary, seed_database
from tests.workflows.conftest import Fakes, order
from workflows.sales_order import Customer, SalesOrderWorkflow, sales_order_workflow_id

UI = "http://127.0.0.1:8233"
HISTORY_DIR = Path(__file__).parent / "histories"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


# fixed test keys (the parametrized ids name them: every xdist worker must collect the same ids)
K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(32, 64))).decode()


def encrypted(keys: str = f"k1={K1}", **kw) -> Settings:
    return Settings(payload_encryption=True, payload_keys=keys, **kw)


# --- the codec ---------------------------------------------------------------------------------


async def test_real_payloads_round_trip_encrypted_and_the_plaintext_is_gone():
    converter = data_converter(encrypted())
    value = order(1234)
    [payload] = await converter.encode([value])
    assert payload.metadata["encoding"] == ENCODING
    assert payload.metadata[KEY_ID] == b"k1"
    assert b"ACME" not in payload.data and b"alice" not in payload.data
    [back] = await converter.decode([payload], [type(value)])
    assert back == value
    # a random nonce per payload: the same value never encrypts the same way twice
    [again] = await converter.encode([value])
    assert again.data != payload.data


async def test_rotation_encrypts_with_the_newest_key_and_old_keys_still_decrypt():
    customer = Customer(
        id="C-9", company_name="Zeta GmbH", contact_phone="+1 555 0100", email="z@z.test"
    )
    [old] = await data_converter(encrypted(f"k1={K1}")).encode([customer])
    rotated = data_converter(encrypted(f"k1={K1},k2={K2}"))
    [new] = await rotated.encode([customer])
    assert (old.metadata[KEY_ID], new.metadata[KEY_ID]) == (b"k1", b"k2")
    assert await rotated.decode([old, new], [Customer, Customer]) == [customer, customer]
    # a ring that dropped k1 refuses the old payload, naming its key id
    with pytest.raises(PayloadDecryptionError, match="'k1'"):
        await data_converter(encrypted(f"k2={K2}")).decode([old], [Customer])


async def test_a_foreign_key_id_is_refused_with_a_clear_error_that_reveals_no_key():
    [payload] = await data_converter(encrypted(f"other={K1}")).encode(["secret"])
    codec = EncryptionCodec(parse_keys(f"k1={K1},k2={K2}", "test"))
    with pytest.raises(PayloadDecryptionError) as err:
        await codec.decode([payload])
    message = str(err.value)
    assert "'other'" in message and "k1, k2" in message and "PROCFLOW_PAYLOAD_KEYS" in message
    assert K1 not in message and K2 not in message


async def test_a_tampered_or_relabelled_payload_fails_authentication():
    codec = EncryptionCodec(parse_keys(f"k1={K1},k2={K2}", "test"))
    [payload] = await codec.encode([Payload(metadata={"encoding": b"json/plain"}, data=b'"x"')])
    tampered = Payload()
    tampered.CopyFrom(payload)
    tampered.data = payload.data[:-1] + bytes([payload.data[-1] ^ 1])
    relabelled = Payload()
    relabelled.CopyFrom(payload)
    relabelled.metadata[KEY_ID] = b"k1"  # encrypted with k2: the key id is authenticated too
    for bad in (tampered, relabelled):
        with pytest.raises(PayloadDecryptionError, match="fails authentication"):
            await codec.decode([bad])


async def test_unencrypted_payloads_pass_through_decode():
    plain = await pydantic_data_converter.encode([order(5), "text", None])
    converter = data_converter(encrypted())
    assert converter.payload_codec is not None
    assert await converter.payload_codec.decode(plain) == plain
    assert (await converter.decode(plain, [type(order(5)), str, type(None)]))[1:] == ["text", None]


async def test_encryption_off_with_keys_listed_only_decrypts():
    [sealed] = await data_converter(encrypted()).encode(["old"])
    off = data_converter(Settings(payload_encryption=False, payload_keys=f"k1={K1}"))
    [fresh] = await off.encode(["new"])
    assert fresh.metadata["encoding"] == b"json/plain"
    assert await off.decode([sealed, fresh], [str, str]) == ["old", "new"]
    assert data_converter(Settings()) is pydantic_data_converter


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ("k1", "entry 1 is not `<key id>=<base64 key>`"),
        (f"k1={K1},={K2}", "entry 2 is not"),
        (f"bad id={K1}", "entry 1 has an invalid key id"),
        ("k1=not*base64!", "key 'k1' is not valid base64"),
        (f"k1={base64.b64encode(b'short').decode()}", "key 'k1' is 5 bytes, AES-256 needs 32"),
        (f"k1={K1},k1={K2}", "key id 'k1' is listed twice"),
        ("", "payload encryption needs a key"),
    ],
)
def test_bad_key_settings_are_refused_naming_the_setting_and_no_key(keys: str, expected: str):
    with pytest.raises(PayloadKeyError) as err:
        data_converter(encrypted(keys))
    assert expected in str(err.value) and "PROCFLOW_PAYLOAD_KEYS" in str(err.value)
    assert K1 not in str(err.value) and K2 not in str(err.value)


def test_keys_from_a_file_one_a_line_with_comments(tmp_path: Path):
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-01\nk1={K1}\n\nk2={K2}  # current\n")
    codec = EncryptionCodec.from_settings(
        Settings(payload_encryption=True, payload_keys_file=str(path))
    )
    assert codec is not None and codec.key_ids == ["k1", "k2"] and codec.encrypt_key_id == "k2"
    path.write_text("k1=nope")
    with pytest.raises(PayloadKeyError, match=r"PROCFLOW_PAYLOAD_KEYS_FILE \(.*\): key 'k1'"):
        data_converter(Settings(payload_encryption=True, payload_keys_file=str(path)))
    with pytest.raises(PayloadKeyError, match="PROCFLOW_PAYLOAD_KEYS_FILE: cannot read"):
        data_converter(Settings(payload_encryption=True, payload_keys_file=str(tmp_path / "no")))
    with pytest.raises(PayloadKeyError, match="not both"):
        data_converter(encrypted(payload_keys_file=str(path)))


# --- a workflow with the codec on ---------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def encrypted_env() -> AsyncIterator[WorkflowEnvironment]:
    """A time-skipping server whose client encrypts (keys k1 and k2, k2 the newest)."""
    env = await WorkflowEnvironment.start_time_skipping(
        data_converter=data_converter(encrypted(f"k1={K1},k2={K2}")),
        test_server_existing_path=binary("temporal-test-server"),
    )
    await register_search_attributes(env.client, check_existing=False)
    try:
        yield env
    finally:
        await env.shutdown()


def payloads_in(message: Message, path: str = "") -> Iterator[tuple[str, Payload]]:
    """Every Payload in a proto message, with the field path that leads to it."""
    if isinstance(message, Payload):
        yield path, message
        return
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        here = f"{path}.{field.name}"
        if field.message_type.GetOptions().map_entry:
            items = [(f"{here}[{key}]", item) for key, item in value.items()]
        elif isinstance(value, Message):
            items = [(here, value)]
        else:  # a repeated field
            items = [(here, item) for item in value]
        for where, item in items:
            if isinstance(item, Message):
                yield from payloads_in(item, where)


async def test_a_sales_order_runs_encrypted_its_history_is_ciphertext_and_replays(
    encrypted_env: WorkflowEnvironment,
):
    fakes = Fakes()
    task_queue = f"codec-{uuid.uuid4()}"
    inp = order(100)
    async with Worker(
        encrypted_env.client,
        task_queue=task_queue,
        workflows=[SalesOrderWorkflow],
        activities=fakes.activities(),
    ):
        handle = await encrypted_env.client.start_workflow(
            SalesOrderWorkflow.run,
            inp,
            id=sales_order_workflow_id(inp.order_no),
            task_queue=task_queue,
        )
        result = await handle.result()
    assert result.paid == Decimal("100.00")  # the worker decrypted its input and activities'
    assert fakes.charges  # the fakes got plaintext requests

    history = await handle.fetch_history()
    raw = History(events=history.events).SerializeToString()
    for secret in (b"ACME Ltd", b"buyer@acme.example", b"123 4567", b"SKU-MUG"):
        assert secret not in raw, secret
    # every payload is encrypted but the search attributes (never encoded: they hold ids, the
    # stage and the amount, no personal data) and what the core SDK writes into its markers
    # itself: patch ids, and a local activity's seq, attempt, type and times (its result is
    # encrypted)
    sdk_own = ("search_attributes", "details[patch-data]", "details[data]")
    found = [
        (path, p)
        for path, p in payloads_in(History(events=history.events))
        if not any(part in path for part in sdk_own)
    ]
    plain = [(path, p.data[:80]) for path, p in found if p.metadata["encoding"] != ENCODING]
    assert not plain, plain
    encrypted_payloads = [p for _, p in found]
    assert len(encrypted_payloads) >= 10
    assert {p.metadata[KEY_ID] for p in encrypted_payloads} == {b"k2"}
    assert sales_order_workflow_id(inp.order_no) == history.workflow_id
    assert "ACME" not in history.workflow_id

    # the history replays with the codec; without it the worker cannot read its own inputs
    with_codec = data_converter(encrypted(f"k1={K1},k2={K2}"))
    await Replayer(workflows=[SalesOrderWorkflow], data_converter=with_codec).replay_workflow(
        history
    )
    plain = Replayer(workflows=[SalesOrderWorkflow], data_converter=pydantic_data_converter)
    with pytest.raises(RuntimeError, match="Failed decoding arguments"):
        await plain.replay_workflow(history)


async def test_a_history_recorded_before_encryption_replays_with_the_codec_on():
    path = next(p for p in sorted(HISTORY_DIR.glob("sales_order__*.json")) if "1200000" in p.name)
    document = json.loads(path.read_text())
    history = WorkflowHistory.from_json(document["workflow_id"], document["history"])
    converter = data_converter(encrypted())
    await Replayer(workflows=[SalesOrderWorkflow], data_converter=converter).replay_workflow(
        history
    )


# --- the codec server ---------------------------------------------------------------------------


@pytest_asyncio.fixture
async def codec_api(
    db_url: str, encrypted_env: WorkflowEnvironment
) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = encrypted(f"k1={K1},k2={K2}", database_url=await seed_database(db_url))
    app = create_app(settings, temporal_client=encrypted_env.client)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http, settings


def token(settings: Settings, username: str) -> str:
    return create_access_token(settings, username, [])[0]


def bearer(settings: Settings, username: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(settings, username)}"}


def as_json(payloads: list[Payload]) -> dict:
    return {"payloads": [json_format.MessageToDict(p) for p in payloads]}


def from_json(body: dict) -> list[Payload]:
    return [json_format.ParseDict(p, Payload()) for p in body["payloads"]]


async def test_the_codec_server_decodes_only_for_operators(codec_api):
    http, settings = codec_api
    customer = Customer(
        id="C-1", company_name="ACME Ltd", contact_phone="+1 555 0100", email="a@b.test"
    )
    sealed = await data_converter(settings).encode([customer, "note"])
    body = as_json(sealed)

    for headers in ({}, {"Authorization": "Bearer nonsense"}, {"Cookie": f"{COOKIE}=nonsense"}):
        r = await http.post("/codec/decode", json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert "ACME" not in r.text
    for user in ("alice", "fiona", "victor"):  # requester, finance, vice-president
        r = await http.post("/codec/decode", json=body, headers=bearer(settings, user))
        assert r.status_code == 403, r.text
        assert "admin, manager" in r.json()["detail"]
    for user in ("ada", "mike"):  # admin, manager
        r = await http.post("/codec/decode", json=body, headers=bearer(settings, user))
        assert r.status_code == 200, r.text
        decoded = await pydantic_data_converter.decode(from_json(r.json()), [Customer, str])
        assert decoded == [customer, "note"]
    # unencrypted payloads come back as they are
    plain = await pydantic_data_converter.encode(["plain"])
    r = await http.post("/codec/decode", json=as_json(plain), headers=bearer(settings, "ada"))
    assert from_json(r.json()) == plain


async def test_encode_then_decode_round_trips_through_the_codec_server(codec_api):
    http, settings = codec_api
    value = order(7)
    originals = await pydantic_data_converter.encode([value, {"a": 1}])
    r = await http.post("/codec/encode", json=as_json(originals), headers=bearer(settings, "ada"))
    assert r.status_code == 200, r.text
    sealed = from_json(r.json())
    assert {p.metadata[KEY_ID] for p in sealed} == {b"k2"}
    assert all(b"ACME" not in p.data for p in sealed)
    # the workers' converter reads what the codec server encrypted
    assert await data_converter(settings).decode(sealed, [type(value), dict]) == [value, {"a": 1}]
    r = await http.post("/codec/decode", json=r.json(), headers=bearer(settings, "mike"))
    assert r.status_code == 200 and from_json(r.json()) == originals


async def test_the_codec_server_refuses_a_foreign_key_and_malformed_bodies(codec_api):
    http, settings = codec_api
    foreign = await data_converter(encrypted(f"elsewhere={new_key()}")).encode(["x"])
    r = await http.post("/codec/decode", json=as_json(foreign), headers=bearer(settings, "ada"))
    assert r.status_code == 422 and "'elsewhere'" in r.json()["detail"], r.text
    for body in ({"payloads": [{"data": "not base64!"}]}, {"payloads": [], "actor": "ada"}, {}):
        r = await http.post("/codec/decode", json=body, headers=bearer(settings, "ada"))
        assert r.status_code == 422, (body, r.text)


async def test_the_codec_cookie_lets_the_ui_decode_for_a_signed_in_operator(codec_api):
    http, settings = codec_api
    r = await http.post("/codec/session")
    assert r.status_code == 401
    r = await http.post("/codec/session", headers=bearer(settings, "alice"))
    assert r.status_code == 403
    mike = token(settings, "mike")
    r = await http.post("/codec/session", headers={"Authorization": f"Bearer {mike}"})
    assert r.status_code == 204, r.text
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={mike};")
    for attribute in ("HttpOnly", "Path=/codec", "SameSite=strict", "Max-Age="):
        assert attribute.lower() in cookie.lower(), cookie
    sealed = await data_converter(settings).encode(["for mike"])
    r = await http.post(
        "/codec/decode", json=as_json(sealed), headers={"Cookie": f"{COOKIE}={mike}"}
    )
    assert r.status_code == 200, r.text
    assert await pydantic_data_converter.decode(from_json(r.json()), [str]) == ["for mike"]
    alice = token(settings, "alice")
    r = await http.post(
        "/codec/decode", json=as_json(sealed), headers={"Cookie": f"{COOKIE}={alice}"}
    )
    assert r.status_code == 403


async def test_cors_admits_the_temporal_ui_origin_for_the_codec_routes_only(codec_api):
    http, settings = codec_api
    preflight = {
        "Origin": UI,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace",
    }
    r = await http.options("/codec/decode", headers=preflight)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == UI
    assert r.headers["access-control-allow-credentials"] == "true"
    r = await http.options("/codec/decode", headers={**preflight, "Origin": "http://evil.test"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = await http.options("/orders", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = await http.post("/auth/me", headers={"Origin": UI})
    assert "access-control-allow-origin" not in r.headers
    # a refusal reaches the UI readable (it shows the payloads still encoded)
    r = await http.post("/codec/decode", json={"payloads": []}, headers={"Origin": UI})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == UI


# --- make run -----------------------------------------------------------------------------------


def test_the_stack_points_the_dev_servers_ui_at_the_codec_server_when_encryption_is_on(
    tmp_path: Path,
):
    config = run_stack.StackConfig(api_port=8123, data_dir=tmp_path)
    assert run_stack.stack_codec_endpoint(config, Settings()) is None
    endpoint = run_stack.stack_codec_endpoint(config, encrypted())
    assert endpoint == "http://127.0.0.1:8123/codec"
    cmd = run_stack.temporal_command(config, "/bin/temporal", codec_endpoint=endpoint)
    assert cmd[cmd.index("--ui-codec-endpoint") + 1] == endpoint
    assert "--ui-codec-endpoint" not in run_stack.temporal_command(config, "/bin/temporal")
    with pytest.raises(run_stack.StackError, match="PROCFLOW_PAYLOAD_KEYS: key 'k1'"):
        run_stack.stack_codec_endpoint(config, encrypted("k1=nope"))
    # the children inherit the key settings
    os.environ["PROCFLOW_PAYLOAD_KEYS"] = f"k1={K1}"
    try:
        assert run_stack.child_env(config)["PROCFLOW_PAYLOAD_KEYS"] == f"k1={K1}"
    finally:
        del os.environ["PROCFLOW_PAYLOAD_KEYS"]


def test_a_client_is_refused_before_connecting_when_encryption_has_no_key():
    with pytest.raises(PayloadKeyError, match="PROCFLOW_PAYLOAD_KEYS"):
        data_converter(Settings(payload_encryption=True))


async def test_connect_uses_the_codec(encrypted_env: WorkflowEnvironment):
    settings = encrypted(temporal_address=encrypted_env.client.service_client.config.target_host)
    from core.temporal import connect

    client: Client = await connect(settings)
    assert isinstance(client.data_converter.payload_codec, EncryptionCodec)
