"""`kopilka demo`: a scripted checkout against the running server, as a
newcomer reads it."""

import secrets
import time

from .client import DEFAULT_SERVER, Client
from .commands.programs import _program_name
from .format import _enum_name, _invoked, balances, day, mask_card, money, when
from .options import _program_option


def _add_demo(sub, client):
    p = sub.add_parser("demo", parents=[client],
                       help="a scripted checkout against the running server",
                       description="Enrol a member with a card, resolve the card, "
                       "quote a receipt, hold points, capture with earn, refund one "
                       "line, printing the balances after each step. Fresh ids each "
                       "run, so it can run again and again.")
    _program_option(p)
    p.set_defaults(run=cmd_demo)


def cmd_demo(args):
    with Client(args) as c:
        Demo(c, _program_name(args.program)).run()
    return 0


class Demo:
    """The checkout a till makes, step by step, as a newcomer reads it."""

    def __init__(self, client, program):
        self.c = client
        self.program = program
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.card = f"7{secrets.randbelow(10 ** 15):015d}"   # fresh 16 digits
        self.step = 0

    def say(self, title):
        self.step += 1
        print(f"\n{self.step}. {title}")

    @staticmethod
    def show(*lines):
        for line in lines:
            print(f"   {line}")

    def op(self, what):
        return f"demo/{self.run_id}/{what}"

    def run(self):
        started = time.monotonic()
        p = self.setting()
        member, available = self.enrol()
        if available == 0:
            available = self.top_up(member)
        self.resolve()
        receipt, quote = self.quote(p)
        held = self.hold(quote, available)
        capture_id = self.capture(receipt, held)
        self.refund(capture_id, receipt)
        server = "" if self.c.server == DEFAULT_SERVER else f" --server {self.c.server}"
        print(f"\nDone: {self.step} steps in {time.monotonic() - started:.2f} s. "
              f"Look again with:\n   {_invoked()} member get {member} --full{server}")

    def setting(self):
        """The program and a till of it; the receipt uses its categories."""
        from kopilka.v1 import programs_pb2 as pb
        p = self.c("Programs.GetProgram", pb.GetProgramRequest(
            name=self.program, view=pb.PROGRAM_VIEW_FULL)).program
        store = p.stores[0] if p.stores else None
        lanes = list(store.lanes) if store else []
        self.lane = f"{store.name if store else 'stores/1'}/lanes/{lanes[0] if lanes else 1}"
        self.currency = p.currency_code
        print(f'Kopilka demo: {p.name} "{p.display_name}" ({p.currency_code}), till '
              f"{self.lane}, server {self.c.server}")
        return p

    def enrol(self):
        from kopilka.v1 import members_pb2 as pb
        self.say("A customer joins the programme and gets a loyalty card")
        r = self.c("Members.EnrolMember", pb.EnrolMemberRequest(
            operation_id=self.op("enrol"), parent=self.program,
            external_id=f"demo-{self.run_id}", card_number=self.card))
        self.member = r.member.name
        self.show(f"member {r.member.name} (CRM id demo-{self.run_id}), "
                  f"card {mask_card(self.card)}",
                  f"welcome bonus: {r.welcome_points} points",
                  f"balances: {balances(r.member.balances)}")
        return r.member.name, r.member.balances.available_points

    def top_up(self, member):
        """Without a welcome bonus there is nothing to spend: credit some by hand."""
        from kopilka.v1 import admin_pb2, common_pb2
        self.say("No welcome bonus here, so an operator credits 200 points (Admin.Adjust)")
        request = admin_pb2.AdjustRequest(
            operation_id=self.op("adjust"), member=member, points=200,
            reason=common_pb2.ADJUSTMENT_REASON_PROMOTION, note="kopilka demo")
        request.activate_time.GetCurrentTime()
        r = self.c("Admin.Adjust", request)
        self.show(f"balances: {balances(r.balances)}")
        return r.balances.available_points

    def resolve(self):
        from kopilka.v1 import common_pb2
        from kopilka.v1 import members_pb2 as pb
        self.say("At the till the cashier scans the card")
        r = self.c("Members.ResolveCard", pb.ResolveCardRequest(
            parent=self.program, card_number=self.card))
        state = _enum_name(common_pb2.CardState, r.card.state, "CARD_STATE_")
        self.show(f"card {mask_card(self.card)} -> {r.member.name} ({state})",
                  f"balances: {balances(r.member.balances)}")

    def receipt(self, p):
        """Two lines in categories points may pay for (when the program says)."""
        from kopilka.v1 import checkout_pb2 as pb
        from kopilka.v1 import common_pb2
        version = next((v for v in p.versions if v.name == p.current_version),
                       p.versions[-1] if p.versions else None)
        categories = list(version.items.categories) if version else []
        excluded = set(version.spend.exclude_categories) if version else set()
        usable = [c for c in categories if c not in excluded] or categories or ["general"]
        first, second = usable[0], usable[1 % len(usable)]
        r = pb.Receipt(receipt_id=f"demo-{self.run_id}")
        r.business_time.GetCurrentTime()
        for number, (category, quantity, price) in enumerate(
                ((first, 2, 45_000), (second, 1, 60_000)), 1):
            r.lines.add(line_number=number, sku=f"demo-sku-{number}", category=category,
                        quantity=quantity,
                        unit_price=common_pb2.Money(currency_code=self.currency,
                                                    minor_units=price),
                        total=common_pb2.Money(currency_code=self.currency,
                                               minor_units=quantity * price))
        return r

    def quote(self, p):
        from kopilka.v1 import checkout_pb2 as pb
        receipt = self.receipt(p)
        lines = ", ".join(f"{line.quantity} x {line.category} at {money(line.unit_price)}"
                          for line in receipt.lines)
        self.say(f"The till asks for a quote: {lines}")
        q = self.c("Checkout.Quote", pb.QuoteRequest(lane=self.lane, card_number=self.card,
                                                    receipt=receipt))
        self.show(f"total {money(q.total)}, due {money(q.due)}"
                  + (f" (discounts {money(q.discount)})" if q.discount.minor_units else ""),
                  f"points may pay up to {q.max_spend_points}; paying all in money "
                  f"earns {q.earn_points} points")
        return receipt, q

    def hold(self, quote, available):
        """Reserves what the customer may spend, so a parallel till cannot."""
        from kopilka.v1 import checkout_pb2 as pb
        points = min(available, quote.max_spend_points)
        if points <= 0 or points < quote.min_spend_points:
            self.say("Nothing to spend on this receipt, so no hold")
            return 0
        self.say(f"The customer spends {points} points: the till holds them while "
                 "the card payment goes through")
        r = self.c("Checkout.Hold", pb.HoldRequest(
            operation_id=self.op("hold"), lane=self.lane, card_number=self.card,
            points=points, receipt_id=f"demo-{self.run_id}"))
        self.show(f"held {r.held_points} points until {when(r.expire_time)}",
                  f"balances: {balances(r.balances)}")
        return r.held_points

    def capture(self, receipt, held):
        """Spend the held points and earn on the money paid: one operation."""
        from kopilka.v1 import checkout_pb2 as pb
        self.say("Payment done: capture spends the held points and earns on the rest")
        op_id = self.op("capture")
        r = self.c("Checkout.Capture", pb.CaptureRequest(
            operation_id=op_id, lane=self.lane, card_number=self.card, receipt=receipt,
            spend_points=held, hold_operation_id=self.op("hold") if held else ""))
        self.show(f"paid {money(r.paid)}, spent {r.spent_points} points, "
                  f"earned {r.earned_points} (spendable from {day(r.earn_activate_time)}: "
                  "the return window)")
        if r.HasField("coupon_issued"):
            terms = r.coupon_issued.terms
            self.show(f"and a coupon, {money(terms.value)} off a purchase from "
                      f"{day(terms.usable_time)} to {day(terms.expire_time)}")
        self.show(f"balances: {balances(r.balances)}")
        return op_id

    def refund(self, capture_id, receipt):
        from kopilka.v1 import checkout_pb2 as pb
        line = receipt.lines[-1]
        self.say(f"Days later the customer returns line {line.line_number} "
                 f"({line.category})")
        r = self.c("Checkout.Refund", pb.RefundRequest(
            operation_id=self.op("refund"), lane=self.lane,
            original_operation_id=capture_id,
            lines=pb.RefundRequest.Lines(returns=[pb.LineReturn(
                line_number=line.line_number, quantity=line.quantity)])))
        self.show(f"refunded {money(r.refunded)}: {r.returned_points} spent points "
                  f"given back, {r.clawed_back_points} earned points taken back",
                  f"balances: {balances(r.balances)}")
