"""Capped exponential backoff with full jitter, for readers and the uplink.

``delay = rng.random() * min(cap, base * 2**attempt)``: the ceiling doubles
with each consecutive failure up to `cap`, and the delay is drawn uniformly
below it, so the readers of a store (or the hwds of a chain, after the core
restarts) do not retry in lockstep. `rng` is injected so tests know every
delay without waiting any of them.
"""


def full_jitter(attempt, base, cap, rng):
    """The delay (seconds) before connection attempt `attempt` + 1."""
    ceiling = cap if attempt >= 64 else min(cap, base * 2 ** attempt)
    return rng.random() * ceiling
