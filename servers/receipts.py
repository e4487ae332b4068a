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
        at = f"{field}.lines[{i}]"
        unit = convert.parse_money(line.unit_price, f"{at}.unit_price", currency, problems)
        total = convert.parse_money(line.total, f"{at}.total", currency, problems)
        lines.append(Line(line.line_number, line.sku, line.category, line.quantity,
                          unit, total, tuple(line.flags)))
    if problems:
        raise invalid(problems)
    return Receipt(message.receipt_id, store, lane, business_time, tuple(lines))


def reason(r, currency):
    out = checkout_pb2.PricingReason(
        code=f"PRICING_REASON_CODE_{r.code.value}", subject=r.name,
        text=TEXT[r.code].format(name=r.name, amount=r.amount))
    if r.amount:
        if r.code in _POINTS:
            out.points = r.amount
        else:
            out.money.CopyFrom(convert.money(r.amount, currency))
    return out


def quote_response(q, program, account, balances, spend=None):
    """QuoteResponse of a core Quote (and the chosen spend's preview)."""
    cur, pid = program.currency, program.id
    money = lambda v: convert.money(v, cur)  # noqa: E731
    out = checkout_pb2.QuoteResponse(
        member=convert.member_name(pid, account),
        program_version=convert.version_name(pid, q.version.number),
        partner=convert.partner_name(pid, q.partner), tier=q.member.tier or "",
        balances=balances, total=money(q.total), discount=money(q.discount),
        coupon_discount=money(q.coupon), due=money(q.due), payable=money(q.payable),
        discounts=[reason(r, cur) for r in q.discounts],
        max_spend_points=q.max_spend, min_spend_points=q.min_spend,
        spend_bound=f"PRICING_REASON_CODE_{q.spend_bound.value}",
        spend_limits=[reason(r, cur) for r in q.spend_limits],
        earn_points=q.earn, reasons=[reason(r, cur) for r in q.reasons],
        lines=[checkout_pb2.LineQuote(
            line_number=line.number, total=money(line.total),
            discount=money(line.discount), coupon_discount=money(line.coupon),
            due=money(line.due), payable_by_points=line.payable, earn_points=line.earn,
            reasons=[reason(r, cur) for r in line.reasons]) for line in q.lines])
    convert.set_time(out, "quote_time", q.now)
    convert.set_time(out, "earn_activate_time", q.activates_at)
    convert.set_time(out, "earn_expire_time", q.expires_at)
    if q.coupon_earned is not None:
        terms = out.coupon_earned
        terms.value.CopyFrom(money(q.coupon_earned.value))
        convert.set_time(terms, "usable_time", q.coupon_earned.usable_from)
        convert.set_time(terms, "expire_time", q.coupon_earned.expires_at)
    if spend is not None:
        priced = q.at(spend)
        out.spend_preview.CopyFrom(checkout_pb2.SpendPreview(
            spend_points=priced.spend, paid=money(priced.paid), earn_points=priced.earn,
            lines=[checkout_pb2.LinePreview(line_number=p.number, spent_points=p.spent,
                                            paid=money(p.paid), earn_points=p.earn)
                   for p in priced.lines]))
    return out


def check(fn, prefix):
    """Runs a core pricing call, turning PricingError into INVALID_ARGUMENT."""
    try:
        return fn()
    except PricingError as error:
        raise refused(error, prefix) from None
