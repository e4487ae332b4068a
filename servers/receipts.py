"""Receipts and quotes across the API: checkout_pb2 to core.receipt and back.

The wire receipt is checked here only for what the core cannot see (money
in the program's currency, a business time); everything else is the core's
`check_receipt`, whose problems (positions counted from 1, `lines[3].total`)
are renamed to the request's field paths (from 0: `receipt.lines[2].total`).
"""

import re

from kopilka.core.pricing import TEXT, Why
from kopilka.core.receipt import Line, PricingError, Receipt
from kopilka.v1 import checkout_pb2

from . import convert
from .convert import money_fields
from .status import invalid

_POSITION = re.compile(r"\[(\d+)\]")
# reasons whose amount is points (the rest are money)
_POINTS = {Why.CAP, Why.BALANCE, Why.MIN_BALANCE, Why.MIN_POINTS}


def api_path(path, prefix):
    """`lines[3].total` (from 1) as `receipt.lines[2].total` (from 0)."""
    path = _POSITION.sub(lambda m: f"[{int(m[1]) - 1}]", path)
    return f"{prefix}.{path}" if path else prefix


def refused(error, prefix):
    """ApiError for a core PricingError, every problem under its API path."""
    return invalid([(api_path(p.path, prefix), p.reason) for p in error.problems])


def receipt(message, store, lane, currency, field="receipt"):
    """A core Receipt from the wire; INVALID_ARGUMENT for money or time."""
    problems = []
    if not message.HasField("business_time"):
        problems.append((f"{field}.business_time", "is required"))
    business_time = convert.parse_time(message.business_time, f"{field}.business_time",
                                       problems)
    lines = []
    for i, line in enumerate(message.lines):
        unit, total = line.unit_price, line.total
        price, amount = unit.minor_units, total.minor_units  # each field read once
        if not (unit.currency_code == total.currency_code == currency
                and price >= 0 and amount >= 0):
            at = f"{field}.lines[{i}]"  # named only when something is wrong
            convert.parse_money(unit, f"{at}.unit_price", currency, problems)
            convert.parse_money(total, f"{at}.total", currency, problems)
        lines.append(Line(line.line_number, line.sku, line.category, line.quantity,
                          price, amount, tuple(line.flags)))
    if problems:
        raise invalid(problems)
    return Receipt(message.receipt_id, store, lane, business_time, tuple(lines))


def reason(r, currency):
    """checkout.PricingReason of a core reason, as a dict."""
    out = {"code": f"PRICING_REASON_CODE_{r.code.value}", "subject": r.name,
           "text": TEXT[r.code].format(name=r.name, amount=r.amount)}
    if r.amount:
        if r.code in _POINTS:
            out["points"] = r.amount
        else:
            out["money"] = money_fields(r.amount, currency)
    return out


def quote_response(q, program, account, balances, spend=None):
    """QuoteResponse of a core Quote (and the chosen spend's preview), built
    in one call; `balances` a common.Balances or its dict."""
    cur, pid = program.currency, program.id
    earned = q.coupon_earned
    preview = None
    if spend is not None:
        priced = q.at(spend)
        preview = {"spend_points": priced.spend, "paid": money_fields(priced.paid, cur),
                   "earn_points": priced.earn,
                   "lines": [{"line_number": p.number, "spent_points": p.spent,
                              "paid": money_fields(p.paid, cur), "earn_points": p.earn}
                             for p in priced.lines]}
    return checkout_pb2.QuoteResponse(
        member=convert.member_name(pid, account),
        program_version=convert.version_name(pid, q.version.number),
        partner=convert.partner_name(pid, q.partner), tier=q.member.tier or "",
        balances=balances, total=money_fields(q.total, cur),
        discount=money_fields(q.discount, cur),
        coupon_discount=money_fields(q.coupon, cur), due=money_fields(q.due, cur),
        payable=money_fields(q.payable, cur),
        discounts=[reason(r, cur) for r in q.discounts],
        max_spend_points=q.max_spend, min_spend_points=q.min_spend,
        spend_bound=f"PRICING_REASON_CODE_{q.spend_bound.value}",
        spend_limits=[reason(r, cur) for r in q.spend_limits],
        earn_points=q.earn, reasons=[reason(r, cur) for r in q.reasons],
        lines=[{"line_number": line.number, "total": money_fields(line.total, cur),
                "discount": money_fields(line.discount, cur),
                "coupon_discount": money_fields(line.coupon, cur),
                "due": money_fields(line.due, cur), "payable_by_points": line.payable,
                "earn_points": line.earn,
                "reasons": [reason(r, cur) for r in line.reasons]} for line in q.lines],
        quote_time=convert.time_fields(q.now),
        earn_activate_time=convert.time_fields(q.activates_at),
        earn_expire_time=convert.time_fields(q.expires_at),
        coupon_earned=None if earned is None else {
            "value": money_fields(earned.value, cur),
            "usable_time": convert.time_fields(earned.usable_from),
            "expire_time": convert.time_fields(earned.expires_at)},
        spend_preview=preview)


def check(fn, prefix):
    """Runs a core pricing call, turning PricingError into INVALID_ARGUMENT."""
    try:
        return fn()
    except PricingError as error:
        raise refused(error, prefix) from None
