"""The store hardware daemon (the hwd issue).

The pure parts, no serial I/O, no threads, no clock of their own:

- `framing`: each reader's framing (magstripe tracks, barcode prefix and
  suffix...) as a frozen dataclass, read strictly from its config table;
- `parser`: `Parser(framing, policy).feed(bytes)` -> card reads and rejects,
  incremental, resynchronising after garbage, memory bounded;
- `magstripe`, `barcode`: the formats (ISO 7811 LRC, AIM identifiers, GTIN
  check digits) and frame encoders for the simulator and tests;
- `filters`: which card numbers are the program's (`CardNumberPolicy`),
  double-swipe suppression (`Deduplicator`), Luhn;
- `events`: `CardRead` and `Reject` (a reason and a byte count, never the
  bytes), and `mask` for logs.
"""
