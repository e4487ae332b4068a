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
  bytes), `LaneRead` (an accepted read with its id, lane, reader and time),
  and `mask` for logs.

The runtime around them:

- `reader`: one reader's thread: a serial port through pyserial, the
  parser, dedup, a sink for accepted reads; reconnects with capped, jittered
  backoff; a health snapshot;
- `spool`: the durable, bounded queue of reads awaiting the core's
  acknowledgement (SQLite, WAL, synchronous=FULL);
- `uplink`: the spool streamed to the core over `Store.StreamCardReads`
  (grpc.aio), a read removed only once acknowledged, reconnecting with
  capped jittered backoff (`backoff`), stale reads dropped;
- `daemon`: readers -> double-swipe filter -> spool -> uplink, with the
  health snapshot that `status` writes to a file and `metrics` serves to
  Prometheus.

Around them: `config` (the store's TOML file, checked strictly), `cli`
(`kopilka hwd run | check | simulate | status`) and `simulate` (virtual
readers on pseudo-terminals and a swipe generator, against a real core).
"""
