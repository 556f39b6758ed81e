"""Config validation: errors name the key and the reason; nothing half-loaded."""

from __future__ import annotations

import os
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


def test_non_utf8_names_the_file_and_the_byte(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"control:\n  period_s: 2\n# caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value) and "not UTF-8" in str(ei.value) and "byte 28 (line 3)" in str(ei.value)


@pytest.mark.parametrize(
    "text, where",
    [
        ("control:\n  period_s: 2\n  period_s: 3\n", "control.period_s: duplicate key (line 3; first on line 2)"),
        ("log_level: INFO\nsocket_mode: '0600'\nlog_level: DEBUG\n", "log_level: duplicate key (line 3;"),
        ("gpu:\n  devices:\n    - type: A100\n      type: T4\n", "gpu.devices[0].type: duplicate key (line 4;"),
        ("control: {period_s: 2, period_s: 3}\n", "control.period_s: duplicate key"),
    ],
)
def test_duplicate_keys_are_errors(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text))
    assert str(ei.value).startswith(where), str(ei.value)
    assert str(tmp_path / "c.yaml") in str(ei.value)


def test_aliases_and_equal_keys_in_different_mappings_are_fine(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "control: &c\n  period_s: 2\nagent:\n  reconnect_max_s: 2\n"))
    assert cfg.control.period_s == 2.0 and cfg.agent.reconnect_max_s == 2.0


def test_socket_group_must_exist(tmp_path: Path) -> None:
    import grp

    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, "socket_group: no-such-group-zz\n"))
    assert str(ei.value).startswith("socket_group: no group 'no-such-group-zz'"), str(ei.value)
    existing = grp.getgrgid(os.getgid()).gr_name
    assert load_config(write(tmp_path, f"socket_group: {existing}\n")).socket_group == existing


def test_check_config_refuses_a_missing_group(tmp_path: Path, capsys) -> None:
    from symbiont.daemon import main

    with pytest.raises(SystemExit) as ei:
        main(["--config", str(write(tmp_path, "socket_group: no-such-group-zz\n")), "--check-config"])
    assert ei.value.code == 2
    assert "socket_group" in capsys.readouterr().err


def test_a_daemon_that_fails_at_start_removes_its_socket(tmp_path: Path) -> None:
    """The group vanished after the config was checked: the daemon exits and takes its socket along."""
    import asyncio

    from symbiont.daemon import serve

    cfg = load_config(None, {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "api.sock"),
                             "libvirt_uri": "test:///default"})
    cfg.socket_group = "no-such-group-zz"
    with pytest.raises(SystemExit, match="socket_group"):
        asyncio.run(serve(cfg))
    assert not (tmp_path / "api.sock").exists()


def test_the_swap_tier_is_bounded_in_slots_and_in_ram_apart() -> None:
    """paging.zram_size_mib is the tier's slots (may exceed RAM: zero-filled pages cost none,
    up to 2x MemTotal); paging.zram_mem_limit_mib is its RAM (at most MemTotal/2)."""
    import psutil

    total = psutil.virtual_memory().total >> 20
    cfg = load_config(None, {"paging": {"enabled": True, "zram_size_mib": total, "zram_mem_limit_mib": total // 4}})
    assert (cfg.paging.zram_size_mib, cfg.paging.zram_mem_limit_mib) == (total, total // 4)
    with pytest.raises(ConfigError, match=r"^paging\.zram_size_mib: .*twice this host's memory"):
        load_config(None, {"paging": {"enabled": True, "zram_size_mib": 2 * total + 1}})
    with pytest.raises(ConfigError, match=r"^paging\.zram_mem_limit_mib: .*half of this host's memory"):
        load_config(None, {"paging": {"enabled": True, "zram_mem_limit_mib": total // 2 + 1}})
    with pytest.raises(ConfigError, match=r"^paging\.zram_mem_limit_mib: must be 0"):
        load_config(None, {"paging": {"zram_mem_limit_mib": 8}})
