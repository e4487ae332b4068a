"""Prometheus metrics for the hwd, made from the daemon's snapshot at each scrape.

A custom collector rather than counters bumped in the hot path: the readers,
the spool and the uplink already keep their counts (for their health), so
the metrics are those counts read when Prometheus asks, and cannot drift
from what `kopilka hwd status` shows. Each daemon has its own registry (no
global state, so tests can run several).

Series (labels: `reader`, `lane` for readers; `reason`, `outcome`):

    kopilka_hwd_reader_up                      1 connected, 0 not
    kopilka_hwd_reader_reads_total             accepted reads handed to the spool
    kopilka_hwd_reader_double_swipes_total     reads suppressed as double swipes
    kopilka_hwd_reader_rejects_total{reason}   frames rejected, by reason
    kopilka_hwd_reader_reconnects_total
    kopilka_hwd_reader_sink_errors_total       reads the spool failed to take
    kopilka_hwd_spool_depth                    reads waiting for the core's ack
    kopilka_hwd_spool_capacity
    kopilka_hwd_spool_oldest_read_age_seconds
    kopilka_hwd_spool_dropped_total{reason}    "full" or "stale"
    kopilka_hwd_core_up                        1 while the stream is open
    kopilka_hwd_core_last_contact_timestamp_seconds
    kopilka_hwd_core_reads_sent_total          resends included
    kopilka_hwd_core_acks_total{outcome}       accepted, duplicate, stale, rejected
    kopilka_hwd_core_reconnects_total
"""

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .events import REASONS

PREFIX = "kopilka_hwd"
POLL_S = 0.1


class SnapshotCollector:
    """Turns `snapshot()` (the status document) into metric families."""

    def __init__(self, snapshot):
        self._snapshot = snapshot

    def collect(self):
        s = self._snapshot()
        rl = ["reader", "lane"]
        up = GaugeMetricFamily(f"{PREFIX}_reader_up", "1 when the reader's port is open", labels=rl)
        reads = CounterMetricFamily(f"{PREFIX}_reader_reads", "Accepted card reads", labels=rl)
        dups = CounterMetricFamily(f"{PREFIX}_reader_double_swipes",
                                   "Reads suppressed as double swipes", labels=rl)
        rejects = CounterMetricFamily(f"{PREFIX}_reader_rejects", "Rejected frames by reason",
                                      labels=rl + ["reason"])
        reconnects = CounterMetricFamily(f"{PREFIX}_reader_reconnects",
                                         "Connections made after an error", labels=rl)
        sink = CounterMetricFamily(f"{PREFIX}_reader_sink_errors",
                                   "Reads the spool failed to take", labels=rl)
        for r in s["readers"]:
            labels = [r["id"], str(r["lane"])]
            up.add_metric(labels, 1 if r["state"] == "connected" else 0)
            reads.add_metric(labels, r["reads"])
            dups.add_metric(labels, r["duplicates"])
            for reason in sorted(set(REASONS) | set(r["rejects"])):
                rejects.add_metric(labels + [reason], r["rejects"].get(reason, 0))
            reconnects.add_metric(labels, r["reconnects"])
            sink.add_metric(labels, r["sink_errors"])
        yield from (up, reads, dups, rejects, reconnects, sink)

        spool = s["spool"]
        yield GaugeMetricFamily(f"{PREFIX}_spool_depth", "Reads waiting for the core's ack",
                                value=spool["depth"])
        yield GaugeMetricFamily(f"{PREFIX}_spool_capacity", "Most reads the spool holds",
                                value=spool["max_reads"])
        oldest = spool["oldest_read_us"]
        yield GaugeMetricFamily(f"{PREFIX}_spool_oldest_read_age_seconds",
                                "Age of the oldest spooled read (0 when empty)",
                                value=0 if oldest is None
                                else max(0, s["written_us"] - oldest) / 1e6)
        dropped = CounterMetricFamily(f"{PREFIX}_spool_dropped",
                                      "Reads dropped unsent: spool full, or stale",
                                      labels=["reason"])
        dropped.add_metric(["full"], spool["dropped_full"])
        dropped.add_metric(["stale"], spool["dropped_stale"])
        yield dropped

        core = s["core"]
        yield GaugeMetricFamily(f"{PREFIX}_core_up", "1 while the read stream is open",
                                value=1 if core["state"] == "connected" else 0)
        contact = core["last_contact_us"]
        yield GaugeMetricFamily(f"{PREFIX}_core_last_contact_timestamp_seconds",
                                "Last connection made or ack received (Unix time)",
                                value=0 if contact is None else contact / 1e6)
        yield CounterMetricFamily(f"{PREFIX}_core_reads_sent",
                                  "Reads sent to the core, resends included",
                                  value=core["sent"])
        acks = CounterMetricFamily(f"{PREFIX}_core_acks", "Acknowledgements by outcome",
                                   labels=["outcome"])
        for outcome in sorted({"accepted", "duplicate", "stale", "rejected"}
                              | set(core["acks"])):
            acks.add_metric([outcome], core["acks"].get(outcome, 0))
        yield acks
        yield CounterMetricFamily(f"{PREFIX}_core_reconnects",
                                  "Connections to the core made after a failure",
                                  value=core["reconnects"])


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):      # no access log: Prometheus scrapes often
        pass


def serve(address, snapshot):
    """Serve /metrics on `address` (host, port) in a thread; returns the server.

    `server.server_port` is the port bound (useful with port 0); `shutdown()`
    returns within `POLL_S`. (prometheus_client's own `start_http_server`
    polls every 0.5 s, which every stop would wait out.)"""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    host, port = address

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, make_wsgi_app(registry), Server,
                         handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_S},
                     name="hwd-metrics", daemon=True).start()
    return server
