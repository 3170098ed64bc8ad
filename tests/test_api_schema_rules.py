"""The schema says what the API enforces: values the OpenAPI document allows are accepted, values it
does not are refused. (The randomized schemathesis run in test_api_schemathesis.py checks the
same on every operation; these pin the rules down one by one, without a database.)"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from iafactory.billing.schemas import UsageEventIn
from iafactory.crm.schemas import DealCreate
from iafactory.http.problems import Problem
from iafactory.pme.schemas import AnalysisCreate
from iafactory.resources import pagination
from iafactory.resources.types import RFC3339
from iafactory.tenancy.schemas import LimitOverrides, TenantCreate
from iafactory.voice.schemas import ConversationCreate

# Same outcome on any PostgreSQL server (CI's PostgreSQL 15 and PgBouncer passes leave it out): request schemas
# checked in Python, no database.
pytestmark = pytest.mark.server_independent

LEAD = "00000000-0000-4000-8000-000000000001"


@pytest.mark.parametrize("id_type", [int, UUID])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_cursor_the_schema_allows_is_a_position(id_type: type, data: st.DataObject) -> None:
    cursor = data.draw(st.from_regex(pagination.CURSOR_PATTERNS[id_type], fullmatch=True))
    created_at, ident = pagination.decode(cursor, id_type)
    assert isinstance(ident, id_type) and created_at.tzinfo is not None
    assert pagination.decode(pagination.encode(created_at, ident), id_type) == (created_at, ident)


def test_a_cursor_round_trips_and_others_are_refused() -> None:
    when = datetime(2026, 11, 2, 10, 0, 0, 123456, tzinfo=UTC)
    for ident, id_type in ((42, int), (UUID(LEAD), UUID)):
        assert pagination.decode(pagination.encode(when, ident), id_type) == (when, ident)
    for bad in ("not-a-cursor", "1.2.3", "-1.5", f"1.{'9' * 19}", "1." + "A" * 32):
        for id_type in (int, UUID):
            with pytest.raises(Problem):
                pagination.decode(bad, id_type)


@pytest.mark.parametrize("value", [0.57, 0, 12500.5, 999999999999.99])
def test_an_amount_in_the_schemas_range_and_step_is_accepted(value: float) -> None:
    assert DealCreate.model_validate({"lead_id": LEAD, "title": "x", "amount": value})


@pytest.mark.parametrize("value", ["12.5", True, 1.005, -1, 10**12])
def test_an_amount_the_schema_refuses_is_refused(value: object) -> None:
    with pytest.raises(ValidationError):
        DealCreate.model_validate({"lead_id": LEAD, "title": "x", "amount": value})


def test_decimal_fields_declare_range_and_step() -> None:
    amount = DealCreate.model_json_schema()["properties"]["amount"]
    assert amount == {
        **amount,
        "type": "number",
        "minimum": 0,
        "exclusiveMaximum": 10**12,
        "multipleOf": 0.01,
        "default": 0,
    }
    score = AnalysisCreate.model_json_schema()["properties"]["score"]["anyOf"][0]
    assert score == {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.01}
    assert UsageEventIn.model_json_schema()["properties"]["quantity"]["multipleOf"] == 1e-06


@pytest.mark.parametrize("value", ["2026-11-01T00:00:00Z", "2026-11-01T01:00:00.5+01:00"])
def test_a_date_time_with_its_offset_is_accepted(value: str) -> None:
    assert re.fullmatch(RFC3339, value)
    assert ConversationCreate.model_validate({"agent_name": "a", "started_at": value}).started_at.tzinfo


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-01T00:00:00",
        "1700000000",
        0,
        "2026-11-01 00:00:00Z",
        "2026-11-01",
        "1355-08-07T04:05:46.7-20:11",
        "0000-01-01T00:00:00Z",
    ],
)
def test_a_date_time_without_offset_or_as_a_number_is_refused(value: object) -> None:
    assert not (isinstance(value, str) and re.fullmatch(RFC3339, value))
    with pytest.raises(ValidationError):
        ConversationCreate.model_validate({"agent_name": "a", "started_at": value})
    with pytest.raises(ValidationError):
        TenantCreate.model_validate({"name": "n", "slug": "s", "region": "CH", "trial_ends_at": value})


def test_date_times_state_the_offset_pattern() -> None:
    started = ConversationCreate.model_json_schema()["properties"]["started_at"]
    assert started["format"] == "date-time" and started["pattern"] == RFC3339


@pytest.mark.parametrize("value", [True, "10", 1.5, 0])
def test_a_limit_is_a_json_integer(value: object) -> None:
    with pytest.raises(ValidationError):
        LimitOverrides.model_validate({"max_members": value})
    assert LimitOverrides.model_validate({"max_members": 10.0}).max_members == 10


def test_the_slug_rule_is_in_the_schema() -> None:
    assert TenantCreate.model_json_schema()["properties"]["slug"]["pattern"] == r"^[a-z0-9]+(-[a-z0-9]+)*$"
