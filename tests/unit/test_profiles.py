"""Profiles: a named set of defaults under the user's keys (issue 15 item 3)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from symbiont import profiles
from symbiont.config import ConfigError, load_config
from symbiont.daemon import main
from symbiont.dedup.part import DedupPart
from symbiont.memory.part import MemoryPart
from symbiont.paging.part import PagingPart
from tests.fakes import Env

GIB = 1 << 30


def _cfg(tmp_path: Path, data: dict, overrides: dict | None = None):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"state_dir": str(tmp_path), "socket": str(tmp_path / "s"), **data}))
    return load_config(path, overrides)


def test_overcommit_turns_the_levers_on_together(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"profile": "overcommit"})
    assert cfg.profile == "overcommit"
    assert cfg.dedup.policy == "hint" and cfg.memory.enabled and cfg.memory.budget_mib == 0
    assert cfg.paging.enabled and cfg.paging.auto_pageout and cfg.paging.idle_park
    assert (cfg.paging.idle_after_s, cfg.paging.idle_cpu_pct) == (60.0, 5.0)
    import psutil

    total = psutil.virtual_memory().total
    # Slots for all of the host's memory, RAM for a quarter of it (zero-filled pages take slots, not RAM).
    assert (cfg.paging.zram_size_mib, cfg.paging.zram_mem_limit_mib) == (total >> 20, total // 4 >> 20)
    plain = _cfg(tmp_path, {})
    assert plain.dedup.policy == "off" and not plain.memory.enabled and not plain.paging.enabled
    assert not plain.paging.idle_park


def test_the_idle_keys_are_checked_naming_the_key(tmp_path: Path) -> None:
    from symbiont.config import ConfigError

    cfg = _cfg(tmp_path, {"paging": {"idle_park": True, "idle_after_s": 5, "idle_cpu_pct": 10}})
    assert cfg.paging.idle_park and cfg.paging.idle_after_s == 5.0 and cfg.paging.idle_cpu_pct == 10.0
    for key, bad in (("idle_after_s", 0.5), ("idle_cpu_pct", 0), ("idle_cpu_pct", 150), ("idle_after_s", "nan")):
        with pytest.raises(ConfigError, match=f"paging.{key}"):
            _cfg(tmp_path, {"paging": {key: float(bad)}})


def test_the_users_keys_win_and_the_command_line_profile_overrides_the_files(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"profile": "overcommit", "paging": {"enabled": False}, "memory": {"tax_rate": 0.5}})
    assert not cfg.paging.enabled and cfg.paging.auto_pageout  # the user's key, the profile's others
    assert cfg.memory.enabled and cfg.memory.tax_rate == 0.5
    cfg = _cfg(tmp_path, {"profile": "nope"}, {"profile": "overcommit"})  # symbiontd --profile overcommit
    assert cfg.memory.enabled


@pytest.mark.parametrize("value", ["nope", 3])
def test_an_unknown_profile_names_the_key_and_the_known_ones(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match=r"^profile: .*known: overcommit"):
        _cfg(tmp_path, {"profile": value})


def test_sizes_follow_the_hosts_memory() -> None:
    for gib in (8, 24):
        paging = profiles.defaults("overcommit", gib * GIB)["paging"]
        assert (paging["zram_size_mib"], paging["zram_mem_limit_mib"]) == (gib * 1024, gib * 256)


def test_print_default_config_with_a_profile(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--print-default-config", "--profile", "overcommit"])
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["profile"] == "overcommit" and out["dedup"]["policy"] == "hint"
    assert out["memory"]["enabled"] and out["paging"]["enabled"] and out["paging"]["auto_pageout"]
    with pytest.raises(SystemExit) as exc:
        main(["--print-default-config", "--profile", "nope"])
    assert exc.value.code == 2 and "profile: no profile 'nope'" in capsys.readouterr().err


def test_with_the_profile_the_parts_are_all_enabled(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, {"profile": "overcommit"})
    env = Env(tmp_path, cfg=cfg)
    dedup, memory, paging = env.add(DedupPart), env.add(MemoryPart), env.add(PagingPart)
    assert dedup.effective_mode().policy == "hint" and dedup.effective_mode().source == "config"
    assert memory.state.enabled  # type: ignore[attr-defined]
    asyncio.run(paging.start())
    assert env.host.calls[0][:3] == ("zram_create", 0, cfg.paging.zram_size_mib << 20)
    assert env.host.zram[0]["mem_limit"] == cfg.paging.zram_mem_limit_mib << 20  # RAM apart from slots
    env.close()
