"""The hwd's uplink: the spool streamed to a real gRPC core on a loopback port.

The core (tests/hwd_core.py) is a real grpc server implementing
`Store.StreamCardReads` as the API says: de-duplication by read id, one ack
per read. It is stopped and started again on the same port to play a core
that goes down. The uplink's clock is moved by hand (stale ages, the ack
timeout), its backoff delays are recorded and never waited; the test waits
only on the core's condition or polls the uplink's health, with a deadline.
"""

import shutil
import subprocess

import pytest
from hwd_core import TOKEN, Clock, Core, CoreServer, Jitter, Sleeps, free_port, wait_for

from kopilka.hwd.config import CoreConfig
from kopilka.hwd.events import BARCODE, TRACK2, LaneRead
from kopilka.hwd.spool import Spool
from kopilka.hwd.uplink import (ACK_TIMEOUT, CONNECTED, DISCONNECTED, UNREACHABLE, Outbox,
                                Uplink)
from kopilka.v1 import store_pb2

LANE = "stores/42/lanes/3"
CARD = "7789000012345676"
STALE_US = 900_000_000
T0 = 1_700_000_000_000_000


def read(i, time_us=T0, card=CARD):
    return LaneRead(f"boot-{i}", LANE, "lane3-msr", card, TRACK2, None, time_us + i)


def core_config(address, **kwargs):
    kwargs = {"token_value": TOKEN, "insecure": True, "backoff_base_ms": 100,
              "backoff_cap_ms": 400, "ack_timeout_ms": 10_000, **kwargs}
    return CoreConfig(address, **kwargs)


@pytest.fixture
def spool(tmp_path):
    with Spool(tmp_path / "spool.db") as s:
        yield s


@pytest.fixture
def running():
    """make(spool, address, ...) -> a started Uplink with a hand clock and recorded sleeps."""
    made = []

    def make(spool, address, clock=None, window=2000, start=True, **core_kwargs):
        uplink = Uplink(core_config(address, **core_kwargs), spool, clock or Clock(T0),
                        STALE_US, sleep=Sleeps(), rng=Jitter(), window=window)
        uplink.sleeps = uplink._sleep
        made.append(uplink)
        return uplink.start() if start else uplink

    yield make
    for uplink in made:
        assert uplink.stop(timeout=3.0), "the uplink did not stop"


@pytest.fixture
def server():
    s = CoreServer().start()
    yield s
    s.stop()


def test_reads_reach_the_core_in_order_and_leave_the_spool_once_acknowledged(
        spool, running, server):
    uplink = running(spool, server.address)
    for i in range(5):
        assert uplink.submit(read(i))
    server.core.wait_for(lambda c: len(c.accepted) == 5, what="five reads")
    wait_for(lambda: spool.depth() == 0, what="an empty spool")
    assert server.core.ids() == [f"boot-{i}" for i in range(5)]
    first = server.core.accepted[0]
    assert (first.lane, first.reader, first.card_number, first.source) == \
        (LANE, "lane3-msr", CARD, store_pb2.CARD_READ_SOURCE_TRACK2)
    assert first.read_time.ToMicroseconds() == T0 and first.symbology == ""
    health = uplink.health()
    assert (health.state, health.sent, health.acks, health.in_flight) == \
        (CONNECTED, 5, {"accepted": 5}, 0)
    assert health.last_contact_us == T0


def test_a_barcode_read_carries_its_source_and_symbology(spool, running, server):
    uplink = running(spool, server.address)
    uplink.submit(LaneRead("scan-1", LANE, "lane3-scanner", "2000000000008", BARCODE,
                           "ean13", T0))
    server.core.wait_for(lambda c: c.accepted, what="the scan")
    (scan,) = server.core.accepted
    assert (scan.source, scan.symbology) == (store_pb2.CARD_READ_SOURCE_BARCODE, "ean13")


def test_core_down_reads_spooled_then_delivered_in_order_none_lost_none_doubled(
        spool, running):
    port = free_port()
    uplink = running(spool, f"127.0.0.1:{port}")
    for i in range(3):
        uplink.submit(read(i))
    wait_for(lambda: len(uplink.sleeps.delays) >= 5, what="retries")
    health = uplink.health()
    assert (health.state, health.last_error, health.sent) == (DISCONNECTED, UNREACHABLE, 0)
    # Full jitter at half-way: half of min(cap 0.4, base 0.1 * 2**n).
    assert uplink.sleeps.delays[:5] == pytest.approx([0.05, 0.1, 0.2, 0.2, 0.2])
    for i in range(3, 6):
        uplink.submit(read(i))                   # reads keep arriving meanwhile
    assert spool.depth() == 6
    with CoreServer(port=port) as server:        # the core comes back
        server.core.wait_for(lambda c: len(c.accepted) == 6, what="all six reads")
        wait_for(lambda: spool.depth() == 0, what="an empty spool")
        assert server.core.ids() == [f"boot-{i}" for i in range(6)]
        assert server.core.duplicates == 0
        assert uplink.health().reconnects == 1


def test_reads_taken_but_not_acknowledged_are_resent_after_a_core_restart(
        spool, running):
    core = Core(ack=False)                       # takes reads, its acks get lost
    server = CoreServer(core).start()
    try:
        uplink = running(spool, server.address)
        for i in range(4):
            uplink.submit(read(i))
        core.wait_for(lambda c: len(c.accepted) == 4, what="four reads taken")
        assert spool.depth() == 4                # not acknowledged: still spooled
        assert uplink.health().in_flight == 4
        server.stop()
        core.ack = True
        server.start()                           # same port, same core memory
        core.wait_for(lambda c: c.duplicates == 4, what="the four resent")
        wait_for(lambda: spool.depth() == 0, what="an empty spool")
        assert core.ids() == [f"boot-{i}" for i in range(4)]   # once each, in order
        assert uplink.health().acks == {"duplicate": 4}
        assert core.streams == 2
    finally:
        server.stop()


def test_a_backlog_goes_in_messages_of_at_most_500(spool, running, server):
    for i in range(1200):
        spool.put(read(i))
    uplink = running(spool, server.address)
    server.core.wait_for(lambda c: len(c.accepted) == 1200, what="the backlog")
    assert server.core.messages == [500, 500, 200]
    assert server.core.ids() == [f"boot-{i}" for i in range(1200)]
    wait_for(lambda: spool.depth() == 0, what="an empty spool")
    uplink.submit(read(5000))                    # a live read afterwards goes alone
    server.core.wait_for(lambda c: len(c.messages) == 4, what="the live read")
    assert server.core.messages[-1] == 1


def test_at_most_window_reads_are_in_flight(spool, running):
    core = Core(ack=False)
    with CoreServer(core) as server:
        for i in range(250):
            spool.put(read(i))
        uplink = running(spool, server.address, window=100)
        core.wait_for(lambda c: len(c.accepted) == 100, what="a window's worth")
        wait_for(lambda: uplink.health().in_flight == 100, what="in flight")
        uplink.wake()
        assert uplink.health().sent == 100 and len(core.accepted) == 100


def test_stale_reads_are_dropped_counted_and_never_sent(spool, running):
    clock = Clock(T0)
    port = free_port()
    for i in range(3):
        spool.put(read(i, time_us=T0))           # read at T0 .. T0 + 2
    uplink = running(spool, f"127.0.0.1:{port}", clock=clock)
    wait_for(lambda: len(uplink.sleeps.delays) >= 2, what="retries")
    clock.now = T0 + STALE_US + 2                # the first two are now too old
    uplink.submit(read(10, time_us=clock.now))
    wait_for(lambda: spool.dropped_stale == 2, what="stale reads dropped")
    with CoreServer(port=port) as server:
        server.core.wait_for(lambda c: len(c.accepted) == 2, what="the fresh reads")
        wait_for(lambda: spool.depth() == 0, what="an empty spool")
        assert server.core.ids() == ["boot-2", "boot-10"]
    assert spool.dropped_stale == 2


def test_a_read_not_acknowledged_in_time_reconnects_and_resends(spool, running):
    clock = Clock(T0)
    core = Core(ack=False)
    with CoreServer(core) as server:
        uplink = running(spool, server.address, clock=clock)
        uplink.submit(read(0))
        core.wait_for(lambda c: len(c.accepted) == 1, what="the read")
        clock.now += 9_999_000                   # just inside the 10 s ack timeout
        uplink.wake()
        core.ack = True
        clock.now += 1_000
        uplink.wake()
        core.wait_for(lambda c: c.duplicates == 1, what="the resend")
        wait_for(lambda: spool.depth() == 0, what="an empty spool")
        assert uplink.health().last_error == ACK_TIMEOUT
        assert core.streams == 2 and core.ids() == ["boot-0"]


def test_a_wrong_token_keeps_reads_spooled(spool, running):
    core = Core(token="the-real-one")
    with CoreServer(core) as server:
        uplink = running(spool, server.address)
        uplink.submit(read(0))
        core.wait_for(lambda c: c.refused_auth >= 2, what="refusals")
        wait_for(lambda: uplink.health().last_error == "unauthenticated", what="the error")
        assert spool.depth() == 1 and core.accepted == []


def test_every_outcome_is_final_rejected_included(spool, running):
    bad = "7789000000000010"
    core = Core(reject={bad})
    with CoreServer(core) as server:
        uplink = running(spool, server.address)
        uplink.submit(read(0))
        uplink.submit(read(1, card=bad))
        uplink.submit(read(2))
        wait_for(lambda: sum(uplink.health().acks.values()) == 3, what="three acks")
        assert uplink.health().acks == {"accepted": 2, "rejected": 1}
        assert spool.depth() == 0 and core.ids() == ["boot-0", "boot-2"]


def test_a_full_spool_refuses_new_reads_and_counts_them(tmp_path, running):
    port = free_port()
    with Spool(tmp_path / "spool.db", max_reads=3) as spool:
        uplink = running(spool, f"127.0.0.1:{port}")
        assert [uplink.submit(read(i)) for i in range(5)] == [True] * 3 + [False] * 2
        assert (spool.depth(), spool.dropped_full) == (3, 2)
        with CoreServer(port=port) as server:
            server.core.wait_for(lambda c: len(c.accepted) == 3, what="the spooled reads")
            wait_for(lambda: spool.depth() == 0, what="an empty spool")
            assert uplink.submit(read(7))        # room again
            server.core.wait_for(lambda c: len(c.accepted) == 4, what="the new read")
        assert server.core.ids() == ["boot-0", "boot-1", "boot-2", "boot-7"]
        assert uplink.stop(timeout=3.0)          # before its spool closes


def test_stop_is_prompt_in_a_long_backoff(spool):
    uplink = Uplink(core_config(f"127.0.0.1:{free_port()}", backoff_base_ms=60_000,
                                backoff_cap_ms=60_000), spool, Clock(T0), STALE_US).start()
    wait_for(lambda: uplink.health().last_error == UNREACHABLE, what="a failed connect")
    assert uplink.stop(timeout=2.0)
    assert uplink.health().state == "stopped"


def test_outbox_bookkeeping():
    box = Outbox(window=600)
    assert box.room() == 500 and box.oldest_sent_us() is None
    box.sent([(1, read(1)), (2, read(2))], now_us=10)
    box.sent([(5, read(5))], now_us=20)
    assert (len(box), box.last_seq, box.room(), box.oldest_sent_us()) == (3, 5, 500, 10)
    assert box.acked("boot-1") == read(1) and box.acked("boot-1") is None
    assert box.oldest_sent_us() == 10            # boot-2, sent at 10, is still out
    box.acked("boot-2")
    assert box.oldest_sent_us() == 20
    box.sent([(i, read(i)) for i in range(6, 606)], now_us=30)
    assert box.room() == 0


# -- TLS ------------------------------------------------------------------------------

def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (EC keys)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=kopilka-test-ca", cwd=d)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                      ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=kopilka-test-{name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=d)
    return d


def test_mutual_tls_with_a_token(spool, running, pki):
    import grpc
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
        root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True)
    with CoreServer(credentials=credentials) as server:
        uplink = running(spool, server.address, insecure=False, ca_file=str(pki / "ca.pem"),
                         cert_file=str(pki / "client.pem"),
                         key_file=str(pki / "client.key"))
        uplink.submit(read(0))
        server.core.wait_for(lambda c: c.accepted, what="a read over TLS")
        wait_for(lambda: spool.depth() == 0, what="an empty spool")

    # Without the client certificate the server refuses the handshake.
    with CoreServer(credentials=credentials) as server:
        uplink = running(spool, server.address, insecure=False, ca_file=str(pki / "ca.pem"))
        uplink.submit(read(1))
        wait_for(lambda: len(uplink.sleeps.delays) >= 2, what="retries")
        assert server.core.accepted == [] and spool.depth() == 1
        assert uplink.health().state != CONNECTED


def test_the_spool_cursor_batch_ack_and_oldest_read(spool):
    for i in range(5):
        spool.put(read(i))
    rows = spool.pending_after(0, limit=2)
    assert [(seq, r.read_id) for seq, r in rows] == [(1, "boot-0"), (2, "boot-1")]
    assert [r.read_id for _, r in spool.pending_after(rows[-1][0], limit=10)] == \
        ["boot-2", "boot-3", "boot-4"]
    assert spool.oldest_read_us() == T0
    assert spool.ack_many(["boot-0", "boot-1", "never"]) == 2
    assert spool.ack_many([]) == 0
    assert (spool.depth(), spool.oldest_read_us()) == (3, T0 + 2)
    assert spool.ack_many(r.read_id for _, r in spool.pending_after(0)) == 3
    assert (spool.depth(), spool.oldest_read_us()) == (0, None)
