"""Checks a new order passes at submission (`submission`), and that the input of an instance
started before them still decodes (replay must never depend on a newer validator)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError

from workflows.sales_order import OrderDetails, SalesOrderInput, submission


def _body(**kw) -> dict:
    body = {
        "order_no": "9100",
        "customer": {
            "id": "CUST-9",
            "company_name": "Probe Ltd",
            "contact_phone": "+40 21 123 4567",
            "email": "buyer@probe.example",
        },
        "lines": [{"sku": "SKU-MUG", "quantity": 1, "unit_price": 100}],
    }
    for path, value in kw.items():
        *parents, leaf = path.split("__")
        node = body
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[leaf] = value
    return body


def _locs(body: dict) -> list[tuple]:
    with pytest.raises(ValidationError) as err:
        submission(OrderDetails.model_validate(body), "alice")
    return [e["loc"] for e in err.value.errors()]


@pytest.mark.parametrize(
    "field, value, loc",
    [
        ("customer__email", "a,b@c.example", ("customer", "email")),
        ("customer__email", "buyer@-bad-.example", ("customer", "email")),
        ("customer__company_name", "Probe\r\nBcc: x", ("customer", "company_name")),
        ("customer__company_name", "Probe\u202eLtd", ("customer", "company_name")),
        ("customer__id", "CUST\x009", ("customer", "id")),
        ("lines__0__sku", "SKU\u2066MUG", ("lines", 0, "sku")),
        ("lines__0__description", "mug\x00", ("lines", 0, "description")),
    ],
)
def test_names_and_addresses_are_checked_at_submission(field, value, loc):
    assert loc in _locs(_body(**{field: value}))


def test_totals_are_bounded_at_submission():
    huge = [{"sku": "SKU-MUG", "quantity": "999999999999", "unit_price": "99999999999999.99"}]
    assert ("lines",) in _locs(_body(lines=huge))
    many = [{"sku": f"S{i}", "quantity": "1000", "unit_price": "99999999999.99"} for i in range(2)]
    assert ("lines",) in _locs(_body(lines=many))


def test_installments_have_at_most_two_decimals():
    body = _body(installments=["33.333", "33.333", "33.334"])
    assert ("installments",) in _locs(body)


def test_a_good_order_passes_and_keeps_the_requester_from_the_credentials():
    inp = submission(OrderDetails.model_validate(_body()), "alice")
    assert inp.requester == "alice" and inp.customer.email == "buyer@probe.example"


def test_the_input_of_an_older_instance_still_decodes():
    """Replay decodes the start input without the submission context."""
    body = _body(customer__email="a,b@c.example", customer__company_name="Probe\r\nLtd")
    inp = SalesOrderInput.model_validate({**body, "requester": "alice"})
    assert inp.customer.email == "a,b@c.example"
    assert inp.lines[0].unit_price == Decimal(100)
