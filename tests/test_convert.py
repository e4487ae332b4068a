"""The dict builders responses are made from in one call give the very
messages the message builders give."""

import pytest

from kopilka.core.reads import Balances
from kopilka.core.records import NEVER
from kopilka.servers import convert
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
