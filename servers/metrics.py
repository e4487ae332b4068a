"""The server's Prometheus metrics, on a registry of its own.

One registry per server (not the process-global one), so tests can run
several servers in one process and read each one's figures.
"""

import os

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, start_http_server)

_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
_PAGE = os.sysconf("SC_PAGE_SIZE")   # LMDB's page size is the OS page size
_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.last_commit_operations = 0
        self.rpcs = Counter("kopilka_rpcs", "RPCs by method and status code",
                            ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("kopilka_rpc_seconds", "RPC latency", ["method"],
                                     buckets=_LATENCY, registry=r)
        self.batch_operations = Histogram("kopilka_batch_operations",
                                          "Operations per committed batch",
                                          buckets=_SIZES, registry=r)
        self.commit_seconds = Histogram("kopilka_commit_seconds",
                                        "Kernel apply and durable commit",
                                        buckets=_LATENCY, registry=r)
        self.deadline_expired = Counter("kopilka_deadline_expired",
                                        "Requests dropped: deadline passed before "
                                        "their batch", registry=r)
        self.queue_depth = Gauge("kopilka_writer_queue_depth",
                                 "Requests waiting for the writer", registry=r)
        self.map_used = Gauge("kopilka_lmdb_map_used_bytes",
                              "Bytes of the LMDB map in use", registry=r)
        self.map_size = Gauge("kopilka_lmdb_map_size_bytes", "LMDB map size",
                              registry=r)
        self.file_size = Gauge("kopilka_lmdb_file_bytes",
                               "Bytes LMDB maps now; with writemap, the data file, "
                               "all allocated: what is in use and the room ahead",
                               registry=r)
        self.subscribers = Gauge("kopilka_feed_subscribers", "Open feed streams",
                                 registry=r)
        self.feed_lag = Gauge("kopilka_feed_lag_entries",
                              "Journal entries the slowest subscriber is behind",
                              registry=r)
        self.card_reads = Counter("kopilka_card_reads", "Card reads by outcome",
                                  ["outcome"], registry=r)

    def on_commit(self, stats):
        """The writer's hook (runs on the writer thread)."""
        if stats.operations:
            self.last_commit_operations = stats.operations
            self.batch_operations.observe(stats.operations)
            self.commit_seconds.observe(stats.seconds)
        if stats.expired:
            self.deadline_expired.inc(stats.expired)

    def watch_writer(self, writer):
        """The queue depth is read from the writer at each scrape."""
        self.queue_depth.set_function(writer.depth)

    def on_ledger(self, info):
        """The LMDB map figures, from `ledger.info()`: set at start and after
        each commit (on the writer thread, the only one that grows the map),
        so a scrape never touches the ledger (it may be closing)."""
        self.map_size.set(info["map_size"])
        self.file_size.set(info["mapped"])
        self.map_used.set((info["last_page"] + 1) * _PAGE)

    def text(self):
        return generate_latest(self.registry)

    def serve(self, port, addr="127.0.0.1"):
        """Exposes /metrics over HTTP; returns the server (tests stop it;
        port 0 picks a free port: `server.server_port`)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server
