"""devices.toml and --device specs."""

from __future__ import annotations

import pytest

from edgerep.devices import available_transports, get_transport
from edgerep.devices.config import load_devices_config, parse_device_spec
from edgerep.errors import ConfigError

TOML = """
[devices.jetson]
url = "agents://jetson.lan:8765"
token_file = "~/.config/edgerep/jetson.token"

[devices.pixel]
adb = "R58M1234ABC"
runner_dir = "~/runners"
"""


def test_load_and_parse(tmp_path):
    f = tmp_path / "devices.toml"
    f.write_text(TOML)
    config = load_devices_config(f)
    assert set(config) == {"jetson", "pixel"}
    assert parse_device_spec("jetson", config) == [
        (
            "agent",
            {
                "name": "jetson",
                "url": "agents://jetson.lan:8765",
                "token_file": "~/.config/edgerep/jetson.token",
            },
        )
    ]
    assert parse_device_spec("pixel", config) == [
        ("adb", {"name": "pixel", "serial": "R58M1234ABC", "runner_dir": "~/runners"})
    ]
    assert parse_device_spec("local", config) == [("local", {"name": "local"})]
    assert parse_device_spec("adb:S1", config) == [("adb", {"name": "adb:S1", "serial": "S1"})]
    assert parse_device_spec("https://h:1", {})[0][0] == "agent"
    everything = parse_device_spec("all", config)
    assert [t for t, _ in everything] == ["local", "adb", "agent", "adb"]


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'jetson'"):
        parse_device_spec("jetsn", {"jetson": {"url": "agent://h"}})
    with pytest.raises(ConfigError, match="needs a serial"):
        parse_device_spec("adb:", {})
    f = tmp_path / "d.toml"
    for text, fragment in [
        ("[devices.a]\nurl = 'agent://h'\npassword = 'x'\n", "unknown keys"),
        ("[devices.a]\n", "exactly one of"),
        ("[devices.local]\nadb = 'S'\n", "reserved"),
        ("devices = 3\n", "table"),
        ("[devices\n", "not valid TOML"),
    ]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            load_devices_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_devices_config(tmp_path / "missing.toml")


def test_default_file_missing_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEREP_DEVICES", str(tmp_path / "nothing.toml"))
    assert load_devices_config() == {}


def test_transport_registry_covers_every_transport():
    assert available_transports() == ["adb", "agent", "local"]
    for name in available_transports():
        assert get_transport(name).name == name
    with pytest.raises(ConfigError, match="did you mean 'agent'"):
        get_transport("agnet")


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ('adb = "S"\npin = "fast"', "pin = 'fast'"),
        ('adb = "S"\npin = 240', "hex mask"),
        ('adb = "S"\ncooldown_s = -1', "cooldown_s = -1"),
        ('adb = "S"\ncooldown_s = "5"', "between 0 and 600"),
        ('url = "agent://h:1"\npin = "big"', "adb devices only"),
    ],
)
def test_adb_options_checked(tmp_path, entry, fragment):
    f = tmp_path / "devices.toml"
    f.write_text(f"[devices.phone]\n{entry}\n")
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        load_devices_config(f)


def test_adb_pin_and_cooldown_reach_the_device(tmp_path):
    f = tmp_path / "devices.toml"
    f.write_text('[devices.phone]\nadb = "S"\npin = "big"\ncooldown_s = 0\n')
    (pair,) = parse_device_spec("phone", load_devices_config(f))
    device = get_transport(pair[0]).device(pair[1])
    assert device.options == {"pin": "big", "cooldown_s": 0}
    f.write_text('[devices.phone]\nadb = "S"\npin = "0xf0"\n')
    (pair,) = parse_device_spec("phone", load_devices_config(f))
    assert get_transport(pair[0]).device(pair[1]).options == {"pin": "f0"}
