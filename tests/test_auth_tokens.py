"""TokenFile.verify remembers the tokens it verified, never past a change
of the file (a revocation) or a token's expiry."""

import json

from kopilka.servers import auth


class Ticking:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_verified_token_is_forgotten_when_the_file_changes(tmp_path):
    path = tmp_path / "tokens.json"
    monotonic, clock = Ticking(), Ticking()
    tokens = auth.TokenFile(path, monotonic=monotonic, clock=clock)
    kept = tokens.add("pos", [42])
    revoked = tokens.add("admin", expires=100)
    for _ in range(2):   # the second time from what it remembers
        assert tokens.verify(kept) == auth.Principal("pos", frozenset({42}),
                                                     kept.split("_")[1])
        assert tokens.verify(revoked).role == "admin"
    assert tokens.verify(kept[:-1] + ("A" if kept[-1] != "A" else "B")) is None
    clock.now = 100                      # its expiry, by the server's clock
    assert tokens.verify(revoked) is None
    clock.now = 0
    data = json.loads(path.read_text())
    data["tokens"] = [r for r in data["tokens"] if r["role"] != "admin"]
    path.write_text(json.dumps(data) + " ")   # another size: a change
    assert tokens.verify(revoked).role == "admin"   # not reread yet (1 s)
    monotonic.now += 1.5
    assert tokens.verify(revoked) is None
    assert tokens.verify(kept).role == "pos"
