"""Security end to end, through real servers on loopback ports: who may call
what (every RPC of every service, enumerated from the generated
descriptors, so a new RPC is covered the day it is added), store scoping,
TLS and mutual TLS with certificates made here, the --insecure guard, and
what the logs may never contain.
"""

import asyncio
import datetime
import io
import ipaddress
import json
import logging
import os
import secrets
import threading

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kopilka.servers import auth, logs
from kopilka.servers.app import Config, Server
from kopilka.v1 import (admin_pb2, admin_pb2_grpc, checkout_pb2, checkout_pb2_grpc,
                        common_pb2, members_pb2, members_pb2_grpc, store_pb2,
                        store_pb2_grpc)

import server_harness
from server_harness import (Clock, Monotonic, RunningServer, error_info,
                            install_program, open_member, path_of, rpcs)

WAIT = 10
LANE42 = "stores/42/lanes/1"
LANE43 = "stores/43/lanes/1"
CARD = "4000001234567899"
UNKNOWN_CARD = "2900000123456"       # an EAN-13 loyalty card nobody has


# --- every RPC, from the descriptors ----------------------------------------------

RPCS = rpcs()


def invoke(channel, method, metadata=(), request=None):
    """Calls `method` with an empty request (or `request`)."""
    if request is None:
        request = message_factory.GetMessageClass(method.input_type)()
    return server_harness.invoke(channel, method, request, metadata, WAIT)


def bearer(token):
    return (("authorization", f"Bearer {token}"),)


UNAUTHENTICATED = ("UNAUTHENTICATED", "CREDENTIALS_INVALID")
NOT_PERMITTED = ("PERMISSION_DENIED", "ROLE_NOT_PERMITTED")
ROLE_OF = {"admin": "admin", "pos": "pos", "pos43": "pos", "hwd": "hwd",
           "integration": "integration"}


def expected(method_path, role):
    return "passed" if ROLE_OF[role] in auth.allowed(method_path) else NOT_PERMITTED


def verdict(outcome):
    """An outcome as the auth layer decided it."""
    return outcome if outcome in (UNAUTHENTICATED, NOT_PERMITTED) else "passed"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the matrix (its calls change nothing that matters:
    every request is empty), with a token that worked and was then removed."""
    srv = RunningServer(tmp_path_factory.mktemp("matrix") / "data")
    install_program(srv)   # the journal is not empty: Subscribe answers at once
    tokens = auth.TokenFile(os.path.join(srv.data, "tokens.json"))
    removed = tokens.add("admin", note="to be revoked")
    srv.monotonic.offset += 1.5          # the server rereads the file
    channel = srv.channel()
    get_stats = next(m for m in RPCS if path_of(m) == "/kopilka.v1.Admin/GetStats")
    assert invoke(channel, get_stats, bearer(removed)) == "OK"
    _remove_token(os.path.join(srv.data, "tokens.json"), removed)
    srv.monotonic.offset += 1.5
    assert invoke(channel, get_stats, bearer(removed)) == UNAUTHENTICATED
    srv.removed = removed
    srv.expired = tokens.add("admin", note="expired",
                             expires=srv.clock.now // 1_000_000 - 1)
    yield srv
    srv.stop()


def _remove_token(path, token):
    token_id = token.split("_", 2)[1]
    with open(path) as f:
        records = json.load(f)["tokens"]
    with open(path + ".tmp", "w") as f:
        json.dump({"tokens": [r for r in records if r["id"] != token_id]}, f)
    os.replace(path + ".tmp", path)


def _bad_credentials(srv):
    admin = srv.tokens["admin"]
    token_id = admin.split("_", 2)[1]
    return {
        "none": (),
        "not bearer": (("authorization", admin),),
        "empty bearer": (("authorization", "Bearer "),),
        "not a token": bearer("not-a-token"),
        "no secret": bearer(f"kop_{token_id}"),
        "unknown id": bearer(f"kop_000000000000_{secrets.token_urlsafe(32)}"),
        "wrong secret": bearer(f"kop_{token_id}_{secrets.token_urlsafe(32)}"),
        "secret of another token": bearer(
            f"kop_{token_id}_{srv.tokens['pos'].split('_', 2)[2]}"),
        "removed": bearer(srv.removed),
        "expired": bearer(srv.expired),
    }


def test_every_rpc_is_enumerated_and_the_table_names_only_real_rpcs():
    paths = {path_of(m) for m in RPCS}
    assert len(paths) >= 33
    for service in ("Checkout", "Members", "Programs", "Feed", "Store", "Admin"):
        assert any(p.startswith(f"/kopilka.v1.{service}/") for p in paths), service
    assert set(auth.ALLOWED) <= paths, "ALLOWED lists an RPC that does not exist"
    # integration services award actions' bonuses; stores do not
    assert auth.allowed("/kopilka.v1.Members/AwardAction") == {"integration", "admin"}


@pytest.mark.parametrize("method", RPCS, ids=path_of)
def test_auth_matrix(shared, method):
    channel = shared.channel()
    path = path_of(method)
    got, want = {}, {}
    for role in ROLE_OF:
        outcome = invoke(channel, method, bearer(shared.tokens[role]))
        got[role], want[role] = verdict(outcome), expected(path, role)
        # passing auth with an empty request must still be a clear answer
        assert outcome == "OK" or outcome[0] not in ("UNKNOWN", "UNAUTHENTICATED"), (
            role, outcome)
    for name, metadata in _bad_credentials(shared).items():
        got[name], want[name] = invoke(channel, method, metadata), UNAUTHENTICATED
    assert got == want


def test_health_and_reflection_need_no_credentials(shared):
    channel = shared.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kopilka.v1.Checkout", "kopilka.v1.Admin"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=WAIT)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=WAIT))
    listed = {s.name for s in answers[0].list_services_response.service}
    assert {m.containing_service.full_name for m in RPCS} <= listed


def test_a_corrupt_tokens_file_accepts_no_token(shared, caplog):
    path = os.path.join(shared.data, "tokens.json")
    with open(path) as f:
        good = f.read()
    channel = shared.channel()
    get_stats = next(m for m in RPCS if path_of(m) == "/kopilka.v1.Admin/GetStats")
    try:
        with open(path + ".tmp", "w") as f:
            f.write(good[:len(good) // 2])         # a botched hand edit
        os.replace(path + ".tmp", path)
        shared.monotonic.offset += 1.5
        assert invoke(channel, get_stats, bearer(shared.tokens["admin"])) == \
            UNAUTHENTICATED
    finally:
        with open(path + ".tmp", "w") as f:
            f.write(good)
        os.replace(path + ".tmp", path)
        shared.monotonic.offset += 1.5
    assert invoke(channel, get_stats, bearer(shared.tokens["admin"])) == "OK"


def test_a_client_streaming_rpc_would_be_authenticated_too(tmp_path):
    """None in the API yet: the interceptor must not let one through bare."""
    from kopilka.servers.interceptor import ServerInterceptor
    from kopilka.servers.metrics import Metrics
    called = []

    async def behavior(requests, context):
        called.append(True)
        return b""

    class Refused(Exception):
        pass

    class Context:
        def invocation_metadata(self):
            return ()

        def auth_context(self):
            return {}

        def code(self):
            return None

        async def abort_with_status(self, status):
            self.status = status
            raise Refused()

    async def continuation(details):
        return grpc.stream_unary_rpc_method_handler(behavior)

    class Details:
        method = "/kopilka.v1.Future/Upload"

    interceptor = ServerInterceptor(
        auth.Authenticator(auth.TokenFile(tmp_path / "tokens.json")), Metrics())

    async def call():
        handler = await interceptor.intercept_service(continuation, Details())
        context = Context()
        with pytest.raises(Refused):
            await handler.stream_unary(iter(()), context)
        return context.status
    status = asyncio.run(call())
    assert status.code == grpc.StatusCode.UNAUTHENTICATED and not called


def test_a_token_works_until_its_expiry_by_the_servers_clock(tmp_path):
    srv = RunningServer(tmp_path / "data")
    try:
        tokens = auth.TokenFile(os.path.join(srv.data, "tokens.json"))
        token = tokens.add("admin", expires=srv.clock.now // 1_000_000 + 60)
        srv.monotonic.offset += 1.5          # the server rereads the file
        channel = srv.channel()
        assert outcome(lambda: stats(channel, bearer(token))) == "OK"
        srv.clock.advance(59_000_000)
        assert outcome(lambda: stats(channel, bearer(token))) == "OK"
        srv.clock.advance(1_000_000)
        assert outcome(lambda: stats(channel, bearer(token))) == UNAUTHENTICATED
        assert outcome(lambda: stats(channel, bearer(srv.tokens["admin"]))) == "OK"
    finally:
        srv.stop()


# --- store scoping ----------------------------------------------------------------

@pytest.fixture
def srv(tmp_path):
    server = RunningServer(tmp_path / "data")
    install_program(server)
    yield server
    server.stop()


def rub(kopecks):
    return common_pb2.Money(currency_code="RUB", minor_units=kopecks)


def a_receipt(srv, receipt_id="r1"):
    out = checkout_pb2.Receipt(receipt_id=receipt_id)
    out.business_time.FromMicroseconds(srv.clock.now)
    out.lines.add(line_number=1, sku="sku1", category="groceries", quantity=2,
                  unit_price=rub(50_000), total=rub(100_000))
    return out


def test_a_pos_of_store_43_cannot_act_on_store_42s_lanes(srv):
    member = open_member(srv, 1, "m1", card="7001", points=1_000)
    ledger = srv.server.ledger
    pb = checkout_pb2
    requests = [
        ("Quote", pb.QuoteRequest(lane=LANE42, card_number="7001",
                                  receipt=a_receipt(srv)), None),
        ("Hold", pb.HoldRequest(operation_id="h1", lane=LANE42, card_number="7001",
                                points=100), b"h1"),
        ("Void", pb.VoidRequest(operation_id="v1", lane=LANE42,
                                hold_operation_id="h1"), b"v1"),
        ("Capture", pb.CaptureRequest(operation_id="c1", lane=LANE42,
                                      card_number="7001", receipt=a_receipt(srv),
                                      spend_points=200), b"c1/capture"),
        ("Refund", pb.RefundRequest(operation_id="f1", lane=LANE42,
                                    original_operation_id="c1",
                                    whole_receipt=True), b"f1"),
    ]
    other = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos43")
    own = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
    for rpc, request, stored in requests:
        with pytest.raises(grpc.RpcError) as caught:
            getattr(other, rpc)(request, timeout=WAIT)
        assert error_info(caught.value) == ("PERMISSION_DENIED", "STORE_NOT_PERMITTED",
                                            []), rpc
        if stored:
            assert ledger.operation(stored) is None, rpc
        getattr(own, rpc)(request, timeout=WAIT)   # the request itself is fine
        if stored:
            assert ledger.operation(stored) is not None, rpc

    hold = pb.PostOperation(hold=pb.HoldRequest(
        operation_id="p1", lane=LANE42, member=f"programs/1/members/{member}",
        points=10))
    answer = other.Post(pb.PostRequest(operations=[hold]), timeout=WAIT)
    status = answer.results[0].status
    assert status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "STORE_NOT_PERMITTED" in str(status.details[0].value)
    assert ledger.operation(b"p1") is None
    answer = own.Post(pb.PostRequest(operations=[hold]), timeout=WAIT)
    assert answer.results[0].status.code == 0
    assert ledger.operation(b"p1") is not None


def test_a_pos_of_store_43_cannot_watch_store_42s_lanes(srv):
    stub = srv.stub(store_pb2_grpc.StoreStub, "pos43")
    with pytest.raises(grpc.RpcError) as caught:
        next(stub.WatchLane(store_pb2.WatchLaneRequest(lane=LANE42), timeout=WAIT))
    assert error_info(caught.value) == ("PERMISSION_DENIED", "STORE_NOT_PERMITTED", [])
    own = srv.stub(store_pb2_grpc.StoreStub, "pos").WatchLane(
        store_pb2.WatchLaneRequest(lane=LANE42), timeout=WAIT)
    assert next(own).WhichOneof("event") == "started"
    own.cancel()


def test_an_hwd_of_store_42_cannot_send_reads_for_store_43(srv):
    def read(read_id, lane):
        out = store_pb2.CardRead(read_id=read_id, lane=lane, reader="msr",
                                 card_number="7001",
                                 source=store_pb2.CARD_READ_SOURCE_TRACK2)
        out.read_time.FromMicroseconds(srv.clock.now)
        return out
    stub = srv.stub(store_pb2_grpc.StoreStub, "hwd")
    message = store_pb2.StreamCardReadsRequest(reads=[read("a", LANE43),
                                                      read("b", LANE42)])
    acks = next(stub.StreamCardReads(iter([message]), timeout=WAIT)).acks
    assert [a.outcome for a in acks] == [store_pb2.CARD_READ_OUTCOME_REJECTED,
                                         store_pb2.CARD_READ_OUTCOME_ACCEPTED]
    assert acks[0].status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]


# --- certificates ------------------------------------------------------------------

class CA:
    """A throwaway certificate authority (EC P-256, valid for a day)."""

    def __init__(self, name):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        self._x509, self._hashes, self._ec = x509, hashes, ec
        self._serialization, self._usage, self._oid = (serialization,
                                                       ExtendedKeyUsageOID, NameOID)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._builder(subject, self.key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(
            self.key, hashes.SHA256())
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject, public_key):
        x509 = self._x509
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject)
                .issuer_name(getattr(self, "cert", None).subject
                             if hasattr(self, "cert") else subject)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, common_name, *units, server=False):
        """(certificate PEM, key PEM); `units` are the subject's OUs."""
        x509, oid = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        subject = x509.Name(
            [x509.NameAttribute(oid.COMMON_NAME, common_name)]
            + [x509.NameAttribute(oid.ORGANIZATIONAL_UNIT_NAME, u) for u in units])
        builder = self._builder(subject, key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(
            [self._usage.SERVER_AUTH if server else self._usage.CLIENT_AUTH]),
            critical=False)
        cert = builder.sign(self.key, self._hashes.SHA256())
        s = self._serialization
        return (cert.public_bytes(s.Encoding.PEM),
                key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8,
                                  s.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography")
    ca, stranger = CA("kopilka test CA"), CA("another CA")
    folder = tmp_path_factory.mktemp("pki")
    cert, key = ca.issue("localhost", server=True)
    (folder / "server.pem").write_bytes(cert)
    (folder / "server.key").write_bytes(key)
    (folder / "ca.pem").write_bytes(ca.pem)
    return {
        "folder": folder, "ca": ca.pem,
        "pos42": ca.issue("till-42", "pos", "store-42"),
        "admin": ca.issue("ops", "admin"),
        # an OU smuggled into the common name must stay in the common name
        "smuggler": ca.issue("till-42, OU=admin", "pos", "store-42"),
        "no role": ca.issue("somebody"),
        "stranger": stranger.issue("till-42", "admin"),
    }


class TlsServer:
    """A server with TLS on a loopback port, on its own loop and thread."""

    def __init__(self, data, pki, *, mutual=False):
        self.data = str(data)
        self.clock, self.monotonic = Clock(), Monotonic()
        os.makedirs(self.data, exist_ok=True)
        tokens = auth.TokenFile(os.path.join(self.data, "tokens.json"))
        self.tokens = {"admin": tokens.add("admin")}
        folder = pki["folder"]
        self.config = Config(
            data=self.data, listen="127.0.0.1:0", tls_cert=str(folder / "server.pem"),
            tls_key=str(folder / "server.key"),
            client_ca=str(folder / "ca.pem") if mutual else None,
            clock=self.clock, monotonic=self.monotonic, sync=False,
            map_size=64 << 20, sweep_seconds=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = Server(self.config)
        self.port = self.call(self.server.start())
        self.ca = pki["ca"]
        self._channels = []

    def call(self, coroutine, timeout=30):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def channel(self, client=None, ca=None):
        """A TLS channel; `client` = (certificate, key) to present one."""
        cert, key = client if client else (None, None)
        credentials = grpc.ssl_channel_credentials(ca or self.ca, key, cert)
        channel = grpc.secure_channel(f"127.0.0.1:{self.port}", credentials)
        self._channels.append(channel)
        return channel

    def plaintext(self):
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self._channels.append(channel)
        return channel

    def stop(self):
        for channel in self._channels:
            channel.close()
        try:
            self.call(self.server.stop(grace=1.0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


def stats(channel, metadata=()):
    return admin_pb2_grpc.AdminStub(channel).GetStats(admin_pb2.GetStatsRequest(),
                                                      metadata=metadata, timeout=WAIT)


def outcome(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as err:
        return error_info(err)[:2]


def test_tls_with_a_bearer_token(tmp_path, pki):
    srv = TlsServer(tmp_path / "data", pki)
    try:
        assert outcome(lambda: stats(srv.plaintext()))[0] == "UNAVAILABLE"
        assert outcome(lambda: stats(srv.channel(), bearer(srv.tokens["admin"]))) == "OK"
        assert outcome(lambda: stats(srv.channel())) == UNAUTHENTICATED
        # a client that does not trust the server's CA does not talk to it
        other = CA("unrelated").pem
        assert outcome(lambda: stats(srv.channel(ca=other),
                                     bearer(srv.tokens["admin"])))[0] == "UNAVAILABLE"
    finally:
        srv.stop()


def test_mutual_tls_takes_role_and_stores_from_the_certificate(tmp_path, pki):
    srv = TlsServer(tmp_path / "data", pki, mutual=True)
    install_program(srv)
    open_member(srv, 1, "m1", card="7001", points=500)
    try:
        pos = srv.channel(pki["pos42"])       # no token: the certificate says who
        watch = store_pb2_grpc.StoreStub(pos).WatchLane(
            store_pb2.WatchLaneRequest(lane=LANE42), timeout=WAIT)
        assert next(watch).WhichOneof("event") == "started"
        watch.cancel()
        checkout = checkout_pb2_grpc.CheckoutStub(pos)
        hold = checkout_pb2.HoldRequest(operation_id="h1", lane=LANE42,
                                        card_number="7001", points=10)
        assert outcome(lambda: checkout.Hold(hold, timeout=WAIT)) == "OK"
        hold43 = checkout_pb2.HoldRequest(operation_id="h2", lane=LANE43,
                                          card_number="7001", points=10)
        assert outcome(lambda: checkout.Hold(hold43, timeout=WAIT)) == (
            "PERMISSION_DENIED", "STORE_NOT_PERMITTED")
        assert outcome(lambda: stats(pos)) == NOT_PERMITTED
        assert outcome(lambda: stats(srv.channel(pki["smuggler"]))) == NOT_PERMITTED
        # a certificate naming no role: only a token can say who it is
        assert outcome(lambda: stats(srv.channel(pki["no role"]))) == UNAUTHENTICATED
        assert outcome(lambda: stats(srv.channel(pki["no role"]),
                                     bearer(srv.tokens["admin"]))) == "OK"
        # refused at the handshake: a certificate of another CA, or none
        assert outcome(lambda: stats(srv.channel(pki["stranger"]),
                                     bearer(srv.tokens["admin"])))[0] == "UNAVAILABLE"
        assert outcome(lambda: stats(srv.channel(),
                                     bearer(srv.tokens["admin"])))[0] == "UNAVAILABLE"
    finally:
        srv.stop()


def test_the_cli_over_mutual_tls(tmp_path, pki, capsys, monkeypatch):
    """`kopilka` with a client certificate and no token at all."""
    from kopilka.servers import cli
    monkeypatch.delenv("KOPILKA_TOKEN", raising=False)
    srv = TlsServer(tmp_path / "data", pki, mutual=True)
    folder = pki["folder"]
    for name in ("admin", "pos42", "stranger"):
        cert, key = pki[name]
        (folder / f"{name}.pem").write_bytes(cert)
        (folder / f"{name}.key").write_bytes(key)

    def kopilka(name, *argv):
        code = cli.main([*argv, "--server", f"localhost:{srv.port}",
                         "--data", str(tmp_path / "no-token-here"),
                         "--ca-cert", str(folder / "ca.pem"),
                         "--client-cert", str(folder / f"{name}.pem"),
                         "--client-key", str(folder / f"{name}.key")])
        out, err = capsys.readouterr()
        return code, out + err
    try:
        code, text = kopilka("admin", "stats")
        assert code == 0 and "members: 0" in text, text
        code, text = kopilka("pos42", "stats")
        assert code == 1 and "ROLE_NOT_PERMITTED" in text, text
        code, text = kopilka("stranger", "stats", "--timeout", "3")
        assert code == 1 and "UNAVAILABLE" in text, text
        assert cli.main(["stats", "--server", f"localhost:{srv.port}",
                         "--client-cert", str(folder / "admin.pem")]) == 1
        assert "needs both --client-cert and --client-key" in capsys.readouterr().err
    finally:
        srv.stop()


@pytest.mark.parametrize("subject, principal", [
    (b"OU=store-42,OU=pos,CN=till-42", ("pos", {42})),
    (b"OU=store-43,OU=store-42,OU=hwd,CN=hwd", ("hwd", {42, 43})),
    (b"OU=admin,CN=ops", ("admin", set())),
    (b"OU=store-42+OU=pos,CN=multi-valued", ("pos", {42})),
    (b"OU=store-42,OU=pos,CN=till\\, OU=admin", ("pos", {42})),
    (b"OU=store-42,OU=pos,CN=till\\2C OU=admin", ("pos", {42})),
    (b"OU=store-42,CN=till\\, OU=pos", None),          # the role only in the CN
    (b"OU=admin,OU=pos,OU=store-42,CN=two roles", None),
    (b"OU=pos,CN=no store", None),
    (b"OU=pos\\,admin,OU=store-1,CN=x", None),
    (b"OU=store-\xd9\xa4\xd9\xa2,OU=hwd,CN=arabic digits", None),
    (b"CN=trailing\\", None),
])
def test_certificate_subjects(subject, principal):
    found = auth.from_certificate({"x509_subject": [subject]})
    assert (found and (found.role, set(found.stores))) == principal


def test_insecure_serves_on_loopback_only_and_warns_on_every_start(tmp_path, log_text):
    for listen in ("0.0.0.0:0", "[::]:0", ":0", "192.0.2.10:50051", "example.com:1"):
        server = Server(Config(data=str(tmp_path / "refused"), listen=listen,
                               insecure=True))
        with pytest.raises(ValueError, match="loopback"):
            asyncio.run(server.start())
    assert not (tmp_path / "refused").exists()   # refused before anything opened
    before = log_text().count("INSECURE")
    for _ in range(2):
        RunningServer(tmp_path / "data").stop()
    warnings = [json.loads(line) for line in log_text().splitlines()
                if "INSECURE" in line]
    assert len(warnings) - before == 2
    assert {w["level"] for w in warnings} == {"warning"}


def test_tls_needs_a_certificate_and_key(tmp_path):
    server = Server(Config(data=str(tmp_path / "data"), listen="127.0.0.1:0"))
    with pytest.raises(ValueError, match="TLS"):
        asyncio.run(server.start())


# --- logs --------------------------------------------------------------------------

@pytest.fixture
def log_text():
    """Captures the server's JSON log lines; returns a () -> text reader."""
    loggers = [logging.getLogger(name) for name in ("kopilka", "grpc")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    stream = io.StringIO()
    logs.configure("DEBUG", stream)
    yield stream.getvalue
    for lg, (handlers, level, propagate) in zip(loggers, saved):
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


def test_logs_are_json_and_never_hold_a_card_number_or_a_secret(tmp_path, log_text):
    srv = RunningServer(tmp_path / "data")
    try:
        install_program(srv)
        open_member(srv, 1, "m1", card=CARD, points=500)
        checkout = srv.stub(checkout_pb2_grpc.CheckoutStub, "pos")
        members = srv.stub(members_pb2_grpc.MembersStub, "pos")
        quote = checkout_pb2.QuoteRequest(lane=LANE42, card_number=CARD,
                                          receipt=a_receipt(srv))
        assert checkout.Quote(quote, timeout=WAIT).member
        members.ResolveCard(members_pb2.ResolveCardRequest(
            parent="programs/1", card_number=CARD), timeout=WAIT)
        failures = []
        for call in (
                lambda: checkout.Quote(checkout_pb2.QuoteRequest(
                    lane=LANE42, card_number=UNKNOWN_CARD,
                    receipt=a_receipt(srv)), timeout=WAIT),
                lambda: members.ResolveCard(members_pb2.ResolveCardRequest(
                    parent="programs/1", card_number=UNKNOWN_CARD), timeout=WAIT),
                lambda: srv.stub(checkout_pb2_grpc.CheckoutStub, "pos43").Quote(
                    quote, timeout=WAIT),
                lambda: checkout.Hold(checkout_pb2.HoldRequest(
                    operation_id="h1", lane=LANE42, card_number=CARD,
                    points=10_000), timeout=WAIT)):
            failures.append(outcome(call)[1])
        assert failures == ["CARD_NOT_FOUND", "CARD_NOT_FOUND", "STORE_NOT_PERMITTED",
                            "INSUFFICIENT_POINTS"]
        # wrong and malformed credentials
        wrong = f"kop_{srv.tokens['admin'].split('_', 2)[1]}_{secrets.token_urlsafe(32)}"
        channel = srv.channel()
        for metadata in (bearer(wrong), bearer(f"kop_{secrets.token_hex(6)}_{CARD}"),
                         (("authorization", f"Basic {wrong}"),)):
            assert outcome(lambda: stats(channel, metadata)) == UNAUTHENTICATED
        # card reads, accepted and rejected
        def read(read_id, card, lane=LANE42):
            out = store_pb2.CardRead(read_id=read_id, lane=lane, reader="msr",
                                     card_number=card,
                                     source=store_pb2.CARD_READ_SOURCE_TRACK2)
            out.read_time.FromMicroseconds(srv.clock.now)
            return out
        reads = store_pb2.StreamCardReadsRequest(reads=[
            read("r1", CARD), read("r2", UNKNOWN_CARD), read("r3", CARD, LANE43),
            read("", CARD)])
        hwd = srv.stub(store_pb2_grpc.StoreStub, "hwd")
        acks = next(hwd.StreamCardReads(iter([reads]), timeout=WAIT)).acks
        assert len(acks) == 4
        # a server bug whose message carries the card: logged, masked
        backend = srv.server.backend
        real = backend.customer

        def broken(request, field_prefix=""):
            raise RuntimeError(f"could not look up {request.card_number}")
        backend.customer = broken
        try:
            with pytest.raises(grpc.RpcError) as caught:
                checkout.Quote(quote, timeout=WAIT)
        finally:
            backend.customer = real
        assert caught.value.code() == grpc.StatusCode.INTERNAL   # not UNKNOWN
        assert CARD not in caught.value.details() and "look up" not in \
            caught.value.details()
    finally:
        srv.stop()
    text = log_text()
    entries = [json.loads(line) for line in text.splitlines()]
    assert {"serving", "refused", "stopped"} <= {e["message"] for e in entries}
    assert any(e["level"] == "error" and "************7899" in e.get("error", "")
               for e in entries)      # the bug's traceback, masked
    refused = [e for e in entries if e["message"] == "refused"]
    assert {e["reason"] for e in refused} >= {"CARD_NOT_FOUND", "CREDENTIALS_INVALID",
                                              "STORE_NOT_PERMITTED"}
    for card in (CARD, UNKNOWN_CARD, CARD[:10], CARD[-10:], UNKNOWN_CARD[:9]):
        assert card not in text
    for token in list(srv.tokens.values()) + [wrong]:
        secret = token.split("_", 2)[2]
        assert secret not in text and secret[:16] not in text


# --- malformed requests --------------------------------------------------------------

@pytest.mark.parametrize("path, bad_utf8", [
    ("/kopilka.v1.Checkout/Hold", b"\x0a\x03\xff\xfeA"),           # operation_id
    ("/kopilka.v1.Feed/Subscribe", b"\x12\x03\xff\xfeA"),          # program
    ("/kopilka.v1.Store/StreamCardReads", b"\x0a\x05\x0a\x03\xff\xfeA"),  # reads[0].read_id
])
def test_a_malformed_request_is_invalid_argument_once_authenticated(shared, path,
                                                                    bad_utf8):
    """Bytes that are no message (invalid UTF-8 in a string, a corrupt wire
    format): gRPC's own parsing said UNKNOWN, and before authentication."""
    method = next(m for m in RPCS if path_of(m) == path)
    head = shared.server.ledger.head()
    for raw in (bad_utf8, b"\x08\xff\xff"):        # then a truncated varint
        for metadata, want in (((), UNAUTHENTICATED),
                               (bearer(shared.tokens["admin"]),
                                ("INVALID_ARGUMENT", "REQUEST_INVALID"))):
            got = server_harness.invoke(shared.channel(), method, raw, metadata, WAIT)
            assert got == want, (raw, metadata)
    assert shared.server.ledger.head() == head
