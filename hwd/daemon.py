"""The hwd itself: readers -> double-swipe filter -> durable spool -> uplink to the core.

Each reader runs in its own thread (`reader.Reader`) and never stops for
another: a reader unplugged, held by another process or flooding garbage
only affects its own health. Accepted reads pass the store-wide
`Deduplicator` (a double swipe on a lane is one read, whichever of the
lane's readers saw it) and go to `Uplink.submit`, which spools them durably
before anything is sent. The uplink streams the spool to the core.

Around them: the health snapshot (`snapshot`, the status file's document,
written every `status_interval` seconds and once more at stop) and the
Prometheus endpoint built from the same snapshot.

`stop()` (SIGTERM, via `run`) ends the readers, then the uplink, and writes
the final status; reads not yet acknowledged stay in the spool and are sent
at the next start. The clock, backoff sleeps and jitter are injectable for
tests, as in the parts.
"""

import logging
import os
import signal
import threading

from . import metrics, status
from .filters import Deduplicator
from .reader import Reader, wall_clock_us
from .spool import Spool
from .uplink import Uplink, open_channel

log = logging.getLogger(__name__)


class Daemon:
    """One store's hwd, built from an `HwdConfig` (see the module doc)."""

    def __init__(self, config, *, clock=wall_clock_us, reader_sleep=None, uplink_sleep=None,
                 rng=None, channel_factory=open_channel, on_ack=None, status_interval=1.0):
        self.config, self.clock = config, clock
        self.status_interval = status_interval
        self.spool = Spool(config.spool_path, config.spool_max_reads)
        self.uplink = Uplink(config.core, self.spool, clock, config.stale_after_s * 1_000_000,
                             sleep=uplink_sleep, rng=rng, on_ack=on_ack,
                             channel_factory=channel_factory)
        dedupe = Deduplicator(config.dedup_window_ms * 1000)
        self.readers = [Reader(rc.id, rc.port, rc.serial, rc.framing, config.policy,
                               config.lane_name(rc.lane), dedupe, self.uplink.submit, clock,
                               reader_sleep, rng)
                        for rc in config.readers]
        self._lanes = {rc.id: rc.lane for rc in config.readers}
        self._ports = {rc.id: rc.port for rc in config.readers}
        self.started_us = None
        self.metrics_server = None
        self._stopping = threading.Event()
        self._status_thread = None
        self._status_lock = threading.Lock()
        self._status_error = None

    def start(self):
        """Start everything; an OSError (the metrics port taken) before any thread runs."""
        self.started_us = self.clock()
        if self.config.metrics_address is not None:
            self.metrics_server = metrics.serve(self.config.metrics_address, self.snapshot)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics_address[0],
                     self.metrics_server.server_port)
        self.uplink.start()
        for reader in self.readers:
            reader.start()
        self.write_status()
        self._status_thread = threading.Thread(target=self._write_status_forever,
                                               name="hwd-status", daemon=True)
        self._status_thread.start()
        log.info("hwd started: store %d, %d readers, core %s", self.config.store,
                 len(self.readers), self.config.core.address)
        return self

    def stop(self, timeout=5.0):
        """Stop everything, write the final status, close the spool; True when
        every thread ended in time."""
        self._stopping.set()
        for reader in self.readers:
            reader.stop(timeout=0)          # all at once, then wait for each
        ended = all([reader.stop(timeout) for reader in self.readers])  # noqa: C419 -- every one
        ended = self.uplink.stop(timeout) and ended
        if self._status_thread is not None:
            self._status_thread.join(timeout)
        if self.started_us is not None:
            self.write_status("stopped")
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.spool.close()
        log.info("hwd stopped")
        return ended

    # -- health -----------------------------------------------------------------------

    def snapshot(self, state="running"):
        """The daemon's health as plain data (the status file's document)."""
        up = self.uplink.health()
        return {
            "format": status.FORMAT,
            "state": state,
            "pid": os.getpid(),
            "store": self.config.store,
            "started_us": self.started_us,
            "written_us": self.clock(),
            "core": {"address": up.address, "state": up.state, "last_error": up.last_error,
                     "connected_since_us": up.connected_since_us,
                     "last_contact_us": up.last_contact_us, "sent": up.sent,
                     "acks": up.acks, "in_flight": up.in_flight,
                     "reconnects": up.reconnects},
            "spool": {"path": self.config.spool_path, "depth": self.spool.depth(),
                      "max_reads": self.spool.max_reads,
                      "oldest_read_us": self.spool.oldest_read_us(),
                      "dropped_full": self.spool.dropped_full,
                      "dropped_stale": self.spool.dropped_stale},
            "readers": [self._reader_status(reader.health()) for reader in self.readers],
        }

    def _reader_status(self, h):
        return {"id": h.name, "lane": self._lanes[h.name], "port": self._ports[h.name],
                "state": h.state, "last_error": h.last_error, "reads": h.reads,
                "duplicates": h.duplicates, "rejects": h.rejects,
                "reconnects": h.reconnects, "sink_errors": h.sink_errors,
                "last_read_us": h.last_read_us}

    def write_status(self, state="running"):
        with self._status_lock:
            try:
                status.write(self.config.status_path, self.snapshot(state))
                self._status_error = None
            except OSError as e:
                if e.strerror != self._status_error:     # once, not every second
                    log.warning("cannot write the status file %s: %s",
                                self.config.status_path, e.strerror)
                self._status_error = e.strerror

    def _write_status_forever(self):
        while not self._stopping.wait(self.status_interval):
            self.write_status()


def run(config, **kwargs):
    """Run a daemon until SIGTERM or SIGINT (the main thread only); exit code 0."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        daemon = Daemon(config, **kwargs).start()
        try:
            while not stop.wait(1.0):
                pass
        finally:
            log.info("stopping")
            daemon.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
