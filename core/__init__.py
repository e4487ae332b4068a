"""Domain core: record layouts, batches, the reference ledger, reads, audit."""
