"""Config validation: errors name the key and the reason; nothing half-loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from symbiont.config import ConfigError, dump_default_config, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg.control.period_s == 5.0
    assert cfg.lab.domain_type == "auto"
    assert cfg.socket_mode == 0o660


def test_values_are_read(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "control:\n  period_s: 2\nsocket_mode: '0600'\nlab:\n  max_vcpus: 8\n"))
    assert cfg.control.period_s == 2.0
    assert cfg.socket_mode == 0o600
    assert cfg.lab.max_vcpus == 8


@pytest.mark.parametrize(
    "text, key",
    [
        ("control:\n  period_s: 0\n", "control.period_s"),
        ("control:\n  period_s: fast\n", "control.period_s"),
        ("control:\n  perod_s: 2\n", "control.perod_s: unknown key"),
        ("lab:\n  domain_type: xen\n", "lab.domain_type"),
        ("lab:\n  vcpus: 4\n  max_vcpus: 2\n", "lab.max_vcpus"),
        ("restore_on_exit: 1\n", "restore_on_exit"),
        ("socket: relative.sock\n", "socket"),
        ("socket_mode: rw\n", "socket_mode"),
        ("agent:\n  max_binary_bytes: 999999999\n", "agent.max_binary_bytes"),
        ("lab: 3\n", "lab"),
        ("nonsense: true\n", "nonsense: unknown key"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    assert str(ei.value).startswith(key), str(ei.value)


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_default_dump_loads_back(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, dump_default_config()))
    assert cfg == load_config()


def test_shipped_example_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    assert load_config(root / "etc" / "symbiontd.yaml").control.period_s == 5
