"""A tier period's close: every member's tier for the period just begun.

At the start of each tier period (the version then in force says which
period: month, quarter or year) a member's tier becomes the one their net
spend of the previous period earns (core/bonuses.py). The close never reads
every account: the members whose tier can change are those with a receipt
or a refund in the previous period (the ledger's member-month rows) and
those holding a tier above the lowest (the ledger's tier index), who drop
to the lowest when they spent too little or nothing. Members with neither
keep what they have (0, never placed, prices as the lowest level).

It writes a SET_TIER only where the tier changes, in bounded batches through
the group-commit writer, so checkouts interleave with a large close. Each
operation id names the program, the period and the member
(`kopilka/tier/{program}/{period}/{account}`): a close run twice for the
same period changes nothing the second time, and a member is placed at most
once per period. Closed members are left alone.
"""

import logging

from kopilka.core.batch import Batch
from kopilka.core.bonuses import months, period_label, standard_zone, tier_of, tier_period
from kopilka.core.records import Code, Status

log = logging.getLogger("kopilka.tiers")
BATCH = 1_000


def current_period(program, now):
    """(start of the tier period holding `now`, the tiers in force then),
    or None when the program has no tiers then."""
    try:
        version = program.version_at(now)
    except LookupError:
        return None
    if version.tiers is None:
        return None
    start, _ = tier_period(now, version.tiers.period, program)
    try:
        tiers = program.version_at(start).tiers
    except LookupError:  # the program began during this period
        tiers = version.tiers
    return (start, tiers) if tiers is not None else None


def targets(ledger, program, start, tiers):
    """{account: tier} of the members a close starting at `start` places,
    for those whose tier changes."""
    previous, _ = tier_period(start - 1, tiers.period, program)
    keys = months(previous, start, program)
    spend = {}
    for _, account, money, _ in ledger.member_months(program.id, keys[0], keys[-1] + 1):
        spend[account] = spend.get(account, 0) + money
    for _, account in ledger.tiered(program.id, 2):
        spend.setdefault(account, 0)
    changes = {}
    for account_id in sorted(spend):
        account = ledger.account(account_id)
        if account is None or account.status == Status.CLOSED:
            continue
        tier = tier_of(tiers, spend[account_id])
        if tier != account.tier:
            changes[account_id] = tier
    return changes


async def close(backend, program, start, tiers):
    """Places the members for the tier period starting at `start`; returns
    how many changed tier."""
    label = period_label(start, tiers.period, standard_zone(program))
    changes = sorted(targets(backend.ledger, program, start, tiers).items())
    changed = 0
    for i in range(0, len(changes), BATCH):
        batch = Batch()
        for account, tier in changes[i:i + BATCH]:
            batch.set_tier(f"kopilka/tier/{program.id}/{label}/{account}", account, tier)
        for (account, _), result in zip(changes[i:i + BATCH],
                                        await backend.apply(batch, None)):
            if result.code == Code.OK and not result.replayed:
                changed += 1
            elif result.code not in (Code.OK, Code.ACCOUNT_CLOSED):
                # OP_ID_REUSED: placed in this period already, the first stands
                log.warning("tier not set", extra={"fields": {
                    "program": program.id, "period": label, "account": account,
                    "code": result.code.name}})
    if changes:
        log.info("tier period closed", extra={"fields": {
            "program": program.id, "period": label, "changed": changed}})
    return changed
