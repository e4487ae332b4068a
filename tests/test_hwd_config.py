"""The hwd's TOML config: the example loads, and every mistake is named by its key path."""

import copy
import tomllib
from pathlib import Path

import pytest

from kopilka.hwd import config as hwd_config
from kopilka.hwd.config import ConfigError, from_mapping, load
from kopilka.hwd.framing import BarcodeFraming, MagstripeFraming

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hwd" / "store.toml"

MINIMAL = {
    "store": 42,
    "core": {"address": "127.0.0.1:50051", "token": "t0ken", "insecure": True},
    "policy": {"ranges": [{"prefix": "7789", "length": 16}]},
    "readers": [{"id": "lane1-msr", "port": "/dev/ttyUSB0", "lane": 1,
                 "framing": {"kind": "magstripe"}}],
}


def problems(mapping):
    with pytest.raises(ConfigError) as e:
        from_mapping(mapping)
    return dict(e.value.problems)


def changed(**sections):
    """MINIMAL with some keys replaced: changed(core={"insecure": None}) drops a key."""
    mapping = copy.deepcopy(MINIMAL)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(mapping.get(section), dict):
            for key, value in values.items():
                if value is None:
                    mapping[section].pop(key, None)
                else:
                    mapping[section][key] = value
        elif values is None:
            mapping.pop(section)
        else:
            mapping[section] = values
    return mapping


def test_the_example_config_loads():
    config = load(EXAMPLE)
    assert config.store == 42
    assert config.core.address == "kopilka.example.net:443"
    assert config.core.token_file == "/etc/kopilka/hwd.token" and not config.core.insecure
    assert [r.id for r in config.readers] == ["lane1-msr", "lane1-scanner", "lane2-msr",
                                              "lane3-msr"]
    msr, scanner, old, remote = config.readers
    assert isinstance(msr.framing, MagstripeFraming) and msr.framing.lrc == "optional"
    assert isinstance(scanner.framing, BarcodeFraming) and scanner.serial.baudrate == 115200
    assert (old.serial.parity, old.serial.bytesize, old.framing.stx_etx) == ("even", 7, True)
    assert remote.port.startswith("rfc2217://")
    assert config.lane_name(3) == "stores/42/lanes/3"
    assert (config.dedup_window_ms, config.spool_max_reads, config.stale_after_s) == \
        (1500, 100_000, 900)
    assert config.metrics_address == ("127.0.0.1", 9464)
    assert config.status_path == "/var/lib/kopilka-hwd/status.json"


def test_defaults_of_a_minimal_config():
    config = from_mapping(MINIMAL)
    reader = config.readers[0]
    assert reader.serial.baudrate == 9600 and reader.serial.exclusive
    assert (reader.serial.backoff_base, reader.serial.backoff_cap) == (0.2, 5.0)
    assert config.core.token() == "t0ken"
    assert config.core.tls_files() == (None, None, None)


@pytest.mark.parametrize("mapping, key, words", [
    (changed(store="42"), "store", "integer"),
    (changed(store=0), "store", "between 1"),
    (changed(store=None), "store", "required"),
    (changed(core=None), "core", "required"),
    (changed(policy=None), "policy", "required"),
    (changed(readers=None), "readers", "required"),
    (changed(readers=[]), "readers", "non-empty"),
    (changed(extra={}), "extra", "unknown key"),
    (changed(core={"address": "nohost"}), "core.address", "host:port"),
    (changed(core={"address": None}), "core.address", "required"),
    (changed(core={"token": "two words"}), "core.token", "visible ASCII"),
    (changed(core={"token_file": "/t"}), "core.token_file", "not both"),
    (changed(core={"token": None}), "core", "no credentials"),
    (changed(core={"cert_file": "/c.pem"}), "core.key_file", "both cert_file and key_file"),
    (changed(core={"insecure": False, "cert_file": "/c", "key_file": "/k",
                   "ca_file": "/ca", "token": None}), None, None),
    (changed(core={"ca_file": "/ca.pem"}), "core.ca_file", "plaintext"),
    (changed(core={"insecure": "yes"}), "core.insecure", "true or false"),
    (changed(core={"backoff_base_ms": 5000, "backoff_cap_ms": 1000}),
     "core.backoff_cap_ms", "at least"),
    (changed(core={"ack_timeout_ms": 1.5}), "core.ack_timeout_ms", "integer"),
    (changed(policy={"ranges": []}), "policy.ranges", "non-empty"),
    (changed(policy={"ranges": [{"prefix": "x", "length": 16}]}),
     "policy.ranges[0].prefix", "digits"),
    (changed(dedup={"window_ms": -1}), "dedup.window_ms", "between"),
    (changed(dedup={"window": 5}), "dedup.window", "unknown key"),
    (changed(spool={"max_reads": 0}), "spool.max_reads", "between"),
    (changed(spool={"stale_after_s": 10 ** 9}), "spool.stale_after_s", "between"),
    (changed(metrics={"address": "9464"}), "metrics.address", "host:port"),
    (changed(status={"path": ""}), "status.path", "empty"),
])
def test_a_mistake_is_named_by_its_key(mapping, key, words):
    if key is None:
        from_mapping(mapping)           # the valid control case
        return
    found = problems(mapping)
    assert key in found, found
    assert words in found[key]


@pytest.mark.parametrize("reader, key, words", [
    ({"id": "lane 1"}, "readers[0].id", "letters"),
    ({"id": "x" * 65}, "readers[0].id", "64"),
    ({"port": "ttyUSB0"}, "readers[0].port", "absolute"),
    ({"port": "sockt://10.0.0.1:4001"}, "readers[0].port", "scheme 'sockt'"),
    ({"lane": 0}, "readers[0].lane", "between 1"),
    ({"lane": "1"}, "readers[0].lane", "integer"),
    ({"baud": 12}, "readers[0].baud", "between"),
    ({"parity": "evn"}, "readers[0].parity", "'even'"),
    ({"stopbits": 3}, "readers[0].stopbits", "between"),
    ({"read_timeout_ms": 5000}, "readers[0].read_timeout_ms", "between"),
    ({"backoff_base_ms": 9000}, "readers[0].backoff_cap_ms", "at least"),
    ({"framing": {"kind": "magstripe", "lrc": "maybe"}}, "readers[0].framing.lrc", "one of"),
    ({"framing": {"kind": "qr"}}, "readers[0].framing.kind", "magstripe"),
    ({"speed": 9600}, "readers[0].speed", "unknown key"),
])
def test_a_reader_mistake_is_named_by_its_key(reader, key, words):
    mapping = copy.deepcopy(MINIMAL)
    mapping["readers"][0].update(reader)
    found = problems(mapping)
    assert key in found, found
    assert words in found[key]


def test_every_problem_is_reported_at_once_and_duplicates_are_named():
    mapping = copy.deepcopy(MINIMAL)
    mapping["store"] = -1
    mapping["core"]["address"] = ""
    second = dict(mapping["readers"][0], lane=2)         # same id, same port
    third = {"port": "/dev/ttyUSB9", "lane": 3, "framing": {"kind": "barcode"}}
    mapping["readers"] += [second, third]
    found = problems(mapping)
    assert set(found) == {"store", "core.address", "readers[1].id", "readers[1].port",
                          "readers[2].id"}
    assert "readers[0]" in found["readers[1].id"]
    with pytest.raises(ConfigError) as e:
        from_mapping(mapping)
    text = hwd_config.describe(e.value, "store.toml")
    assert text.splitlines()[0] == "store.toml: invalid hwd config (5 problems):"
    assert "  readers[1].port: readers[0] uses the same port" in text


def test_files_syntax_and_secrets(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("store = 42\n[core\n")
    with pytest.raises(ConfigError) as e:
        load(bad)
    assert "not valid TOML" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "absent.toml")
    assert "cannot read" in str(e.value)

    # Secrets are read when hwd connects, each failure under its key.
    token_file = tmp_path / "token"
    config = from_mapping(changed(core={"token": None, "token_file": str(token_file)}))
    with pytest.raises(ConfigError) as e:
        config.core.token()
    assert e.value.problems[0][0] == "core.token_file"
    token_file.write_text("  s3cret-token\n")
    assert config.core.token() == "s3cret-token"
    token_file.write_text("two\nlines\n")
    with pytest.raises(ConfigError):
        config.core.token()
    tls = from_mapping(changed(core={"insecure": None, "ca_file": str(tmp_path / "ca.pem")}))
    with pytest.raises(ConfigError) as e:
        tls.core.tls_files()
    assert e.value.problems[0][0] == "core.ca_file"


def test_the_example_is_valid_toml_with_no_unknown_sections():
    with open(EXAMPLE, "rb") as f:
        document = tomllib.load(f)
    assert set(document) <= hwd_config.SECTIONS
