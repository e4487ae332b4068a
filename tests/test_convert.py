"""The dict builders responses are made from in one call give the very
messages the message builders give; stored answers are packed as json.dumps
would pack them."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kopilka.core.reads import Balances
from kopilka.core.records import NEVER
from kopilka.servers import convert
from kopilka.servers.backend import pack
from kopilka.v1 import common_pb2


@pytest.mark.parametrize("micros", [1, 999_999, 1_000_000, 1_767_225_600_123_456,
                                    -1, -1_500_000, 253_402_300_799_999_999])
def test_time_fields_is_the_timestamp(micros):
    made = common_pb2.Balances(as_of_time=convert.time_fields(micros)).as_of_time
    assert made == convert.timestamp(micros)


def test_time_fields_of_never_or_none_is_absent_and_out_of_range_refused():
    assert convert.time_fields(NEVER) is None and convert.time_fields(None) is None
    assert not common_pb2.Balances(as_of_time=convert.time_fields(NEVER)).HasField(
        "as_of_time")
    for micros in (253_402_300_800_000_000, -62_135_596_801_000_000):
        with pytest.raises(ValueError):
            convert.timestamp(micros)
        with pytest.raises(ValueError):
            convert.time_fields(micros)


def test_balances_and_money_fields_are_the_messages():
    b = Balances(7, 1, 1, available=10, pending=2, held=3, balance=15, debt=1,
                 earned=20, spent=4, expired=1, tier=2)
    now = 1_767_225_600_000_001
    assert common_pb2.Balances(**convert.balances_fields(b, now)) == \
        convert.balances(b, now)
    assert common_pb2.Money(**convert.money_fields(150, "RUB")) == \
        convert.money(150, "RUB")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text()
    | st.floats(),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_pack_is_compact_json_dumps(answer):
    assert pack(answer) == json.dumps(answer, separators=(",", ":")).encode()


def test_pack_refuses_what_json_refuses():
    with pytest.raises(TypeError, match="not JSON serializable"):
        pack({"a": b"bytes"})
