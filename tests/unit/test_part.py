"""The Part lifecycle, driven as the daemon drives it, against the shared fakes.

``Weights`` is the worked example of docs/architecture.md ("how to write a part"): it is
tested here so that the example in the docs stays true.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from symbiont.config import check
from symbiont.host.fake import FakeDomain
from symbiont.knobs import KnobKind
from symbiont.part import Part, PartOrderError, Period, order
from tests.fakes import Env


# -- the worked example (docs/architecture.md) -------------------------------------------------
@dataclass
class WeightsConfig:
    busy_percent: float = 50.0  # a QEMU above this CPU % is busy
    busy_shares: int = 512  # cpu_shares of a busy VM (the others keep 1024)

    def validate(self, key: str) -> None:
        check(0 < self.busy_percent <= 100, f"{key}.busy_percent", "must be in (0, 100]")


def shares_for(cpu_percent: dict[str, float], cfg: WeightsConfig) -> dict[str, int]:
    """The policy, pure: busy VMs get fewer CPU shares."""
    return {vm: cfg.busy_shares if pct > cfg.busy_percent else 1024 for vm, pct in cpu_percent.items()}


class Weights(Part):
    name = "weights"
    config = WeightsConfig

    async def start(self) -> None:
        host = self.ctx.host
        self.ctx.knobs.register(KnobKind(
            "weights_cpu_shares", self.name,
            read=lambda vm, _key: host.schedinfo(vm)["cpu_shares"],
            write=lambda vm, _key, value: host.set_schedinfo(vm, {"cpu_shares": int(value)})))

    async def observe(self, period: Period) -> dict[str, float]:
        out = {}
        for rec in self.ctx.vms():
            pct = self.ctx.latest(rec.name).get("libvirt", {}).get("qemu_cpu_percent")
            if pct is not None:
                out[rec.name] = float(pct)
        return out

    def decide(self, obs: dict[str, float]) -> dict[str, int]:
        return shares_for(obs, self.cfg)

    async def act(self, decision: dict[str, int]) -> None:
        for vm, shares in decision.items():
            if self.ctx.knobs.current(vm, "weights_cpu_shares", default=1024) != shares:
                await self.ctx.knobs.turn(self.name, vm, "weights_cpu_shares", "", shares)
                self.ctx.decisions.log("shares", vm, {"shares": shares}, {"ok": True})


# -- tests -------------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path, FakeDomain("busy", qemu_cpu_percent=90.0), FakeDomain("idle", qemu_cpu_percent=3.0))
    e.register("busy")
    e.register("idle")
    yield e
    e.close()


def test_the_worked_example_turns_a_knob_through_the_ledger_and_restores_it(env) -> None:
    part = env.add(Weights, WeightsConfig())

    async def run() -> None:
        await env.start()
        await env.period()
        assert env.host.domains["busy"].schedinfo["cpu_shares"] == 512
        assert env.host.domains["idle"].schedinfo["cpu_shares"] == 1024  # unchanged: no call made
        assert ("set_schedinfo", "idle", {"cpu_shares": 1024}) not in env.host.calls
        row = env.knobs.get("busy", "weights_cpu_shares")
        assert row is not None and row["original"] == 1024 and row["current"] == 512 and row["part"] == "weights"
        await env.period()  # nothing new: no second write
        assert env.host.calls.count(("set_schedinfo", "busy", {"cpu_shares": 512})) == 1
        done = await env.knobs.restore(vm="busy", reason="test")
        assert [r["kind"] for r in done] == ["weights_cpu_shares"]
        assert env.host.domains["busy"].schedinfo["cpu_shares"] == 1024
        assert env.knobs.rows() == []

    asyncio.run(run())
    assert [d["action"] for d in env.store.decisions("busy")] == ["shares"]
    assert part.status() == {}


def test_a_required_part_runs_first_and_its_observation_is_readable(env) -> None:
    seen: list[Any] = []

    class Reader(Part):
        name = "a_reader"  # sorts before "weights": only `requires` puts it after
        requires = ("weights",)

        async def observe(self, period: Period) -> None:
            seen.append(self.ctx.observation("weights"))

    class Nosy(Part):
        name = "nosy"

        async def observe(self, period: Period) -> None:
            seen.append(self.ctx.observation("weights"))  # not required: KeyError, logged

    env.add(Weights, WeightsConfig())
    env.add(Reader)
    env.add(Nosy)
    names = order({"weights": Weights, "a_reader": Reader, "nosy": Nosy})
    assert names.index("weights") < names.index("a_reader")
    env.parts = {n: env.parts[n] for n in names}
    for p in env.parts.values():
        p.ctx._parts = env.parts

    async def run() -> None:
        await env.start()
        await env.period()

    asyncio.run(run())
    assert seen == [{"busy": 90.0, "idle": 3.0}]  # Nosy's KeyError did not stop the period
    assert env.host.domains["busy"].schedinfo["cpu_shares"] == 512  # the parts after it still ran
    with pytest.raises(KeyError, match="does not require"):
        env.parts["nosy"].ctx.peer("weights")


def test_order_refuses_cycles_and_missing_parts_by_name() -> None:
    class A(Part):
        name = "a"
        requires = ("b",)

    class B(Part):
        name = "b"
        requires = ("a",)

    with pytest.raises(PartOrderError, match="cycle: a -> b -> a"):
        order({"a": A, "b": B})
    with pytest.raises(PartOrderError, match="'a' requires b"):
        order({"a": A})


def test_a_failed_write_leaves_no_ledger_row(env) -> None:
    from symbiont.host.port import HostError

    env.add(Weights, WeightsConfig())
    env.host.fail["set_schedinfo"] = HostError("libvirt went away")

    async def run() -> None:
        await env.start()
        await env.period()  # the act raised: logged, the period went on

    asyncio.run(run())
    assert env.knobs.rows() == []
    assert env.host.domains["busy"].schedinfo["cpu_shares"] == 1024


def test_parts_are_discovered_and_ordered_without_a_central_list() -> None:
    from symbiont.plugins import part_classes

    classes = part_classes()
    assert "memory" in classes
    names = order(classes)
    for name, cls in classes.items():
        assert cls.name == name
        for r in cls.requires:
            assert names.index(r) < names.index(name)


def test_the_daemon_runs_exactly_the_packages_with_a_part_module(tmp_path) -> None:
    """Every daemon part is a Part subclass, in ``requires`` order; a package without
    ``part.py`` (the CLI-only ``cluster``) gets no part, whatever other modules it has."""
    from pathlib import Path

    import symbiont
    from symbiont.config import load_config
    from symbiont.daemon import Daemon
    from symbiont.host.fake import FakeHost

    with_part = {p.parent.name for p in Path(symbiont.__file__).parent.glob("*/part.py")}
    cfg = load_config(None, {"state_dir": str(tmp_path / "state"), "socket": str(tmp_path / "api.sock")})
    d = Daemon(cfg, host=FakeHost())
    try:
        assert set(d.parts) == with_part and "cluster" not in d.parts
        assert all(type(p) is not Part and isinstance(p, Part) and p.name == n for n, p in d.parts.items())
        assert list(d.parts) == order({n: type(p) for n, p in d.parts.items()})
    finally:
        d.store.close()


def test_a_parts_config_is_its_discovered_section() -> None:
    """Part.config and symbiont/<part>/config.py's CONFIG are one class: the YAML section the
    daemon validates is the one the part is given."""
    from symbiont.config import load_config, section_classes
    from symbiont.part import NoConfig
    from symbiont.plugins import part_classes

    sections = section_classes()
    cfg = load_config()
    for name, cls in part_classes().items():
        if cls.config is NoConfig:
            assert name not in sections
        else:
            assert sections[name] is cls.config and isinstance(getattr(cfg, name), cls.config)


def test_the_worked_example_in_the_docs_is_this_one() -> None:
    """docs/architecture.md's "How to write a part" shows Weights: each line of its code (steps
    1-3) is a line of this file, so the page cannot drift from the tested example."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "architecture.md").read_text().split("## How to write a part", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)[:3]
    assert len(blocks) == 3 and "class Weights(Part):" in blocks[2]

    def lines(text: str) -> set[str]:
        return {ln.split("  # ")[0].strip() for ln in text.splitlines()} - {""}

    here = lines(Path(__file__).read_text())
    shown = set().union(*(lines(b) for b in blocks)) - {"CONFIG = WeightsConfig"}
    assert not shown - here, sorted(shown - here)

