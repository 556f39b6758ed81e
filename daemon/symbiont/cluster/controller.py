"""The cluster controller: a long-running process that watches every host daemon and acts.

Why: placement was a library and a one-shot ``place execute``; nothing watched a cluster. Each
round (``period_s``) the controller

1. polls every host daemon's live inventory (``GET /v1/placement/inventory``:
   :func:`symbiont.placement.live.collect` on that host); a host that does not answer is marked
   ``down`` in the journal and left out of the round (planned around, never crashed on);
2. plans with :func:`symbiont.placement.live.plan_live`: Sandpiper hotspot detection and
   migrations, idle-VM consolidation onto ``idle_host`` and the wake-up moves that spread busy
   VMs back out (rebalancing);
3. applies rate limits: at most ``max_migrations`` moves per round, no VM moved again within
   ``cooldown_s`` (the balloon steps of a VM whose move is held back are held back too);
4. executes the plan step by step through :class:`symbiont.placement.execute.Executor` (live
   migrations host to host, balloon steps through the hosts' daemons), each step journaled in
   sqlite before it starts and after it ends (:mod:`symbiont.cluster.journal`). A balloon step
   the daemon refuses (its guest floor) skips only that VM's later steps, logged as
   ``step-refused``; a failed migration stops the plan (the hosts may be other than planned).

Every round is a decision in the journal with its inputs (per-host utilisation and samples
count, hosts down, configuration) and its outcome (hotspots, moves made and held back).

A crash (kill -9) mid-plan is put right by :meth:`Controller.resume`, run at every start: for a
move that was under way it waits for libvirt's own clean-up, then makes sure the VM exists on
exactly one host (finishing the migration where the destination runs it, else cancelling it
and resuming the source), and that exactly that host's daemon has it registered.

This module is not a daemon part's controller (it defines no ``start``/``stop``): it runs in
its own process (``symbiont cluster controller``) or is imported by tests.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symbiont.cluster.journal import Journal
from symbiont.placement.execute import Executor, HostEntry, MemorySpec, MoveSpec, Step, parse_plan

log = logging.getLogger(__name__)

FetchFn = Callable[[str], dict[str, Any]]  # daemon spec -> its live inventory (raises when it does not answer)
ExecutorFn = Callable[[Mapping[str, HostEntry]], Executor]


def enter_netns(name: str) -> None:
    """Move this process (its calling thread: call it before starting threads) into a network
    namespace, so that the lab's qemu+tcp addresses are reachable, as on a real network."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = f"/run/netns/{name}"
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


def hosts_from_cluster(work_dir: str | Path) -> tuple[dict[str, HostEntry], str, bool]:
    """Host entries, the namespace to run in and the shared-storage flag of a lab from ``cluster up``."""
    from symbiont.cluster.lab import load_state
    from symbiont.placement.execute import parse_hosts

    if Path(work_dir).is_file():  # real hosts: a YAML file with placement.hosts-style entries
        import yaml

        try:
            st = yaml.safe_load(Path(work_dir).read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{work_dir}: not YAML: {exc}") from None
        if not isinstance(st, dict) or not isinstance(st.get("hosts"), list):
            raise ValueError(f"{work_dir}: expected a mapping with a 'hosts' list (id, libvirt_uri, daemon, migrate_uri)")
    else:
        st = load_state(work_dir)
    if st is None:
        raise ValueError(f"{work_dir}: no cluster.yaml (is a cluster up? 'symbiont cluster up')")
    entries = st["hosts"]
    if not Path(work_dir).is_file():  # a lab's state also records namespaces, PIDs, VMs
        entries = [{k: e[k] for k in ("id", "libvirt_uri", "daemon", "migrate_uri") if k in e} for e in entries]
    hosts = parse_hosts(entries, f"{work_dir} hosts")
    return hosts, str(st.get("netns") or ""), bool(st.get("migrate_unsafe"))


def fetch_inventory(spec: str, timeout: float = 10.0) -> dict[str, Any]:
    from symbiont.client import ApiError, Client

    try:
        if spec.startswith(("http://", "https://")):
            import httpx

            r = httpx.get(spec.rstrip("/") + "/v1/placement/inventory", timeout=timeout)
            r.raise_for_status()
            return dict(r.json())
        with Client(spec, timeout=timeout) as c:
            return dict(c.get("/v1/placement/inventory"))
    except ApiError as exc:
        raise ConnectionError(f"daemon {spec}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any transport failure is "not answering"
        raise ConnectionError(f"daemon {spec}: {type(exc).__name__}: {exc}") from None


@dataclass
class ControllerConfig:
    hosts: dict[str, HostEntry] = field(default_factory=dict)  # configured hosts (a lab's, or real ones)
    daemons: list[str] = field(default_factory=list)  # or only daemons: hosts learnt from their inventories
    netns: str = ""  # run inside this network namespace (a lab's)
    journal: Path = Path("controller.sqlite")
    dry_run: bool = False
    period_s: float = 10.0
    max_migrations: int = 2  # per round
    cooldown_s: float = 120.0  # per VM, from the start of its last move
    unsafe: bool = False  # VIR_MIGRATE_UNSAFE (shared storage libvirt does not recognise)
    mode: str = "gray-box"  # plan_live: black-box series where the daemon has them, else the agent's
    thresholds: dict[str, float] = field(default_factory=lambda: {"cpu": 0.75, "mem": 0.75})
    k: int = 3
    n: int = 5
    idle_host: str = ""  # "": no idle consolidation
    idle: dict[str, Any] = field(default_factory=dict)  # IdleConfig fields
    poll_timeout_s: float = 10.0
    resume_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.hosts and not self.daemons:
            raise ValueError("controller: no hosts (give a cluster or --hosts SOCK...)")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(f"period: must be a positive number of seconds, got {self.period_s}")
        if self.max_migrations < 0 or not (math.isfinite(self.cooldown_s) and self.cooldown_s >= 0):
            raise ValueError("max_migrations and cooldown must be >= 0")
        if self.mode not in ("black-box", "gray-box"):
            raise ValueError(f"mode: {self.mode!r} is not black-box or gray-box")
        for r, t in self.thresholds.items():
            if not (isinstance(t, (int, float)) and 0 < t <= 10):
                raise ValueError(f"thresholds.{r}: {t!r} is not in (0, 10]")
        from symbiont.placement.idle import IdleConfig

        try:
            IdleConfig(**{k: v for k, v in self.idle.items() if v is not None})
        except (TypeError, ValueError) as exc:  # a bad idle setting would fail every round instead
            raise ValueError(f"idle: {exc}") from None


class Controller:
    """One controller; :meth:`run` loops, :meth:`round` is one period, :meth:`execute_plan` one plan."""

    def __init__(self, cfg: ControllerConfig, fetch: FetchFn | None = None,
                 make_executor: ExecutorFn | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        from symbiont.host.migrate import quiet_errors

        quiet_errors()  # libvirt's errors arrive as exceptions, not on stderr
        if cfg.netns:
            enter_netns(cfg.netns)
        self.journal = Journal(cfg.journal)
        self.fetch = fetch or (lambda spec: fetch_inventory(spec, cfg.poll_timeout_s))
        self.make_executor = make_executor or self._executor
        self.known: dict[str, HostEntry] = dict(cfg.hosts)  # hosts learnt so far (daemon-only mode)
        self.down: dict[str, str] = {}

    def _executor(self, hosts: Mapping[str, HostEntry]) -> Executor:
        return Executor(hosts, unsafe=self.cfg.unsafe,
                        log_decision=lambda a, vm, i, o: self.journal.decide(a, vm, i, o))  # fmt: skip

    def close(self) -> None:
        self.journal.close()

    # -- polling ----------------------------------------------------------------------------
    def poll(self) -> dict[str, dict[str, Any]]:
        """Inventories of the hosts that answer, by host id; the others are marked down."""
        specs: dict[str, str] = {h.id: h.daemon for h in self.cfg.hosts.values() if h.daemon}
        for d in self.cfg.daemons:
            if d not in specs.values():
                specs[f"daemon:{d}"] = d
        invs: dict[str, dict[str, Any]] = {}
        for key, spec in specs.items():
            hid = key
            try:
                inv = self.fetch(spec)
                hid = str(inv["host"]["id"])
                if key in self.cfg.hosts and hid != key:
                    raise ConnectionError(f"daemon {spec} says it is host {hid!r}, configured as {key!r}")
                invs[hid] = inv
                if hid not in self.known:
                    self.known[hid] = HostEntry(hid, str(inv.get("libvirt_uri") or "qemu:///system"), spec)
                self.down.pop(hid, None)
                if (ch := self.journal.host_seen(hid, True)) is not None and ch == "up":
                    self.journal.decide("host-up", None, {"host": hid, "daemon": spec}, {"state": "up"})
            except (ConnectionError, KeyError, TypeError) as exc:
                if key.startswith("daemon:"):
                    hid = next((h.id for h in self.known.values() if h.daemon == spec), key)
                self.down[hid] = str(exc)
                if self.journal.host_seen(hid, False, str(exc)) == "down":
                    self.journal.decide("host-down", None, {"host": hid, "daemon": spec}, {"reason": str(exc)})
                log.warning("host %s not answering: %s", hid, exc)
        return invs

    # -- planning ---------------------------------------------------------------------------
    def plan(self, invs: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        from symbiont.placement.live import plan_live

        if not invs:
            return {"moves": [], "hosts": []}
        hot = {"mode": self.cfg.mode, "thresholds": dict(self.cfg.thresholds), "k": self.cfg.k, "n": self.cfg.n}
        idle = None
        if self.cfg.idle_host and self.cfg.idle_host in invs:
            idle = {"idle_host": self.cfg.idle_host, **self.cfg.idle}
        return plan_live(list(invs.values()), hotspots=hot, idle=idle)

    def limit(self, steps: list[Step], now: float | None = None) -> tuple[list[Step], list[dict[str, Any]]]:
        """Rate limits: per-VM cooldown, then at most ``max_migrations`` moves; a held-back VM's
        balloon steps are held back with its move."""
        now = time.time() if now is None else now
        held: dict[str, str] = {}
        moves = 0
        for s in steps:
            if not isinstance(s, MoveSpec) or s.vm in held:
                continue
            last = self.journal.last_move(s.vm)
            if last is not None and now - last < self.cfg.cooldown_s:
                held[s.vm] = f"cooldown: moved {now - last:.0f} s ago (< {self.cfg.cooldown_s:.0f} s)"
            elif moves >= self.cfg.max_migrations:
                held[s.vm] = f"rate limit: {self.cfg.max_migrations} migrations per round"
            else:
                moves += 1
        kept = [s for s in steps if s.vm not in held]
        return kept, [{"vm": vm, "reason": why} for vm, why in held.items()]

    def fit(self, steps: list[Step], invs: Mapping[str, dict[str, Any]]) -> tuple[list[Step], list[dict[str, Any]]]:
        """A round's own plan: hold back (with the reason) each VM whose move would leave its
        destination over capacity × overcommit in some resource, instead of refusing the whole
        plan. The idle planner sizes the idle host by memory alone, so on a host whose vCPUs are
        all allocated every round's plan was refused and nothing was parked, not even the VMs
        that fit. Steps are taken in order (a shrink before its move counts); a held-back VM's
        balloon steps are held back with its move, as for the rate limit."""
        demand: dict[str, dict[str, float]] = {}
        where: dict[str, str] = {}
        for hid, inv in invs.items():
            for v in inv["host"].get("vms", []):
                demand[v["id"]] = {k: float(x) for k, x in v.get("demand", {}).items()}
                where[v["id"]] = hid
        held: dict[str, str] = {}
        for s in steps:
            if s.vm in held or s.vm not in demand:
                continue  # an unknown VM is capacity_check's to refuse, with its reason
            if isinstance(s, MemorySpec):
                demand[s.vm]["mem"] = s.mem_mib / 1024.0
                continue
            if s.dst not in invs:
                continue
            h = invs[s.dst]["host"]
            oc = h.get("overcommit") or {}
            for r, cap in h["capacity"].items():
                lim = float(cap) * float(oc.get(r, 1.0))
                load = sum(d.get(r, 0.0) for vm, d in demand.items() if where[vm] == s.dst) + demand[s.vm].get(r, 0.0)
                if load > lim * (1 + 1e-9):
                    held[s.vm] = f"{s.dst} would be over capacity: {r} {load:.4g} > {lim:.4g} (capacity × overcommit)"
                    break
            else:
                where[s.vm] = s.dst
        return [s for s in steps if s.vm not in held], [{"vm": vm, "reason": why} for vm, why in held.items()]

    def capacity_check(self, steps: list[Step], invs: Mapping[str, dict[str, Any]]) -> None:
        """Refuse a plan that names a VM no host daemon manages, or that leaves a receiving host
        over its capacity (× overcommit) in any resource."""
        demand: dict[str, dict[str, float]] = {}
        where: dict[str, str] = {}
        for hid, inv in invs.items():
            for v in inv["host"].get("vms", []):
                demand[v["id"]] = {k: float(x) for k, x in v.get("demand", {}).items()}
                where[v["id"]] = hid
        receiving = set()
        for s in steps:
            if s.vm not in demand:
                raise ValueError(f"{s.kind if isinstance(s, MemorySpec) else 'move'} of {s.vm}: no host daemon "
                                 f"manages a running VM of that name (hosts answering: {', '.join(invs) or 'none'})")  # fmt: skip
            if isinstance(s, MoveSpec):
                where[s.vm] = s.dst
                receiving.add(s.dst)
            else:
                demand[s.vm]["mem"] = s.mem_mib / 1024.0
        for hid in sorted(receiving):
            h = invs[hid]["host"]
            oc = h.get("overcommit") or {}
            for r, cap in h["capacity"].items():
                lim = float(cap) * float(oc.get(r, 1.0))
                load = sum(d.get(r, 0.0) for vm, d in demand.items() if where[vm] == hid)
                if load > lim * (1 + 1e-9):
                    raise ValueError(f"host {hid} would be over capacity after the plan: {r} {load:.4g} > {lim:.4g}")

    # -- execution ---------------------------------------------------------------------------
    def execute_plan(self, plan: Any, source: str = "plan", invs: Mapping[str, dict[str, Any]] | None = None,
                     limit: bool = False, inputs: Any = None) -> dict[str, Any]:  # fmt: skip
        """Check a whole plan against the live cluster, then run it step by step, journaled.
        A bad plan (unknown VM or host, host not answering, over capacity) is refused with a
        reason and changes nothing."""
        try:
            steps = parse_plan(plan)
        except ValueError as exc:
            return self._refuse(source, plan, inputs, [], str(exc))
        if invs is None:
            invs = self.poll()
        held: list[dict[str, Any]] = []
        if limit:
            steps, held = self.fit(steps, invs)
            steps, more = self.limit(steps)
            held += more
            for h in held:
                self.journal.decide("held-back", h["vm"], {"source": source}, h)
        if not steps:
            return {"state": "empty", "steps": [], "held": held}
        up = {hid: e for hid, e in self.known.items() if hid in invs}
        try:
            for s in steps:
                for hid in (s.src, s.dst) if isinstance(s, MoveSpec) else (s.host,):
                    if hid in self.down:
                        raise ValueError(f"host {hid} is not answering ({self.down[hid]}); planned around")
                    if hid not in up:
                        raise ValueError(f"unknown host {hid!r}; hosts answering: {', '.join(sorted(up)) or 'none'}")
            self.capacity_check(steps, invs)
            ex = self.make_executor(up)
        except ValueError as exc:
            return self._refuse(source, plan, inputs, steps, str(exc))
        with ex:
            try:
                checked = ex.check(steps)
            except ValueError as exc:
                return self._refuse(source, plan, inputs, steps, str(exc))
            if self.cfg.dry_run:
                pid = self.journal.new_plan(source, plan, inputs, [_sd(s) for s in steps], "dry-run")
                self.journal.decide("plan", None, {"source": source, "plan": plan, "inputs": inputs},
                                    {"state": "dry-run", "steps": checked})  # fmt: skip
                return {"id": pid, "state": "dry-run", "steps": checked, "held": held}
            pid = self.journal.new_plan(source, plan, inputs, [_sd(s) for s in steps], "running")
            results: list[dict[str, Any]] = []
            errors: list[str] = []
            refused: dict[str, str] = {}  # VM -> why its later steps are skipped
            for i, s in enumerate(steps):
                if s.vm in refused:
                    res = {**_sd(s), "ok": False, "skipped": True, "error": refused[s.vm]}
                    self.journal.end_step(pid, i, "skipped", {"reason": refused[s.vm]})
                    results.append(res)
                    continue
                ctx: dict[str, Any] = {}
                if isinstance(s, MoveSpec):
                    v = ex.view(up[s.src], s.vm)
                    ctx = {"policy": (v or {}).get("policy"), "registered": v is not None}
                self.journal.start_step(pid, i, ctx)
                res = ex.migrate(s) if isinstance(s, MoveSpec) else ex.set_memory(s)
                self.journal.end_step(pid, i, "done" if res.get("ok") else "failed", res)
                results.append(res)
                if res.get("ok"):
                    continue
                errors.append(f"step {i} ({_what(s)}) failed: {res.get('error')}")
                if isinstance(s, MemorySpec):
                    # A refused balloon step (the daemon's guest floor, typically: the plan is a
                    # round old) is one daemon call that changed nothing. Only this VM's later
                    # steps depend on it (its move was sized on the shrink): skip those, run the
                    # other VMs' steps; the next round plans this VM afresh.
                    refused[s.vm] = f"step {i} ({_what(s)}) failed: {res.get('error')}"
                    self.journal.decide("step-refused", s.vm, {"plan": pid, "step": _sd(s)},
                                        {"error": res.get("error"), "skipped": "this VM's later steps"})  # fmt: skip
                    continue
                # A failed migration may leave either host other than planned: stop the plan.
                self.journal.skip_rest(pid, errors[-1])
                break
            state = "failed" if errors else "done"
            self.journal.set_plan(pid, state, "; ".join(errors))
        return {"id": pid, "state": state, "results": results, "held": held}

    def _refuse(self, source: str, plan: Any, inputs: Any, steps: list[Step], reason: str) -> dict[str, Any]:
        pid = self.journal.new_plan(source, plan, inputs, [_sd(s) for s in steps], "refused", reason)
        self.journal.decide("refused", None, {"source": source, "plan": plan}, {"reason": reason})
        log.warning("plan refused: %s", reason)
        return {"id": pid, "state": "refused", "reason": reason}

    def round(self) -> dict[str, Any]:
        """One period: poll, plan, rate-limit, execute; the round is logged with its inputs."""
        t0 = time.time()
        invs = self.poll()
        inputs = {
            "hosts": {hid: {"vms": [v["id"] for v in inv["host"].get("vms", [])],
                            "capacity": inv["host"].get("capacity"),
                            "samples": {m: {vm: len(s) for vm, s in series.items()}
                                        for m, series in (inv.get("usage") or {}).items()}}
                      for hid, inv in invs.items()},
            "down": dict(self.down),
            "config": {"mode": self.cfg.mode, "thresholds": self.cfg.thresholds, "k": self.cfg.k, "n": self.cfg.n,
                       "idle_host": self.cfg.idle_host, "idle": self.cfg.idle, "max_migrations": self.cfg.max_migrations,
                       "cooldown_s": self.cfg.cooldown_s, "dry_run": self.cfg.dry_run},
        }  # fmt: skip
        try:
            plan = self.plan(invs)
        except ValueError as exc:
            self.journal.decide("round", None, inputs, {"error": str(exc)})
            return {"ts": t0, "error": str(exc), "down": dict(self.down)}
        out: dict[str, Any] = {"ts": t0, "hosts": sorted(invs), "down": dict(self.down),
                               "hotspots": [h["host"] for h in plan.get("hotspots", {}).get("hotspots", [])],
                               "planned": plan.get("moves", [])}  # fmt: skip
        if plan.get("moves") or (plan.get("idle") or {}).get("actions"):
            res = self.execute_plan(plan, "round", invs, limit=True, inputs=inputs)
            out["execution"] = res
        self.journal.decide("round", None, inputs, {k: v for k, v in out.items() if k != "ts"})
        out["seconds"] = round(time.time() - t0, 2)
        return out

    def run(self, stop: threading.Event, rounds: int | None = None) -> Iterator[dict[str, Any]]:
        """Resume what a dead controller left, then a round every ``period_s`` until ``stop``."""
        yield {"resume": self.resume() if not self.cfg.dry_run else "skipped (dry run)"}
        n = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                yield self.round()
            except Exception as exc:  # noqa: BLE001 - one bad round must not end the service
                log.exception("round failed")
                self.journal.decide("round", None, {}, {"error": f"{type(exc).__name__}: {exc}"})
                yield {"error": str(exc)}
            n += 1
            if rounds is not None and n >= rounds:
                break
            stop.wait(max(0.0, self.cfg.period_s - (time.monotonic() - t0)))

    # -- crash recovery ---------------------------------------------------------------------
    def resume(self) -> list[dict[str, Any]]:
        """Put right the plans a killed controller left running (see the module docstring)."""
        todo = self.journal.unfinished()
        if not todo:
            return []
        invs = self.poll()
        hosts = {hid: e for hid, e in self.known.items() if hid in invs}
        out = []
        with self.make_executor(hosts) as ex:
            for p in todo:
                fixed = []
                for st in p["steps"]:
                    if st["state"] != "started":
                        continue
                    if st["kind"] == "move":
                        r = self._reconcile_move(ex, hosts, st)
                    else:  # a balloon step is one daemon call: the daemon finished it or never got it
                        r = {"vm": st["vm"], "action": "left as the daemon has it"}
                    self.journal.end_step(p["id"], st["idx"], r.get("state", "interrupted"), r)
                    fixed.append(r)
                self.journal.skip_rest(p["id"], "controller restarted mid-plan; the next round plans afresh")
                self.journal.set_plan(p["id"], "resumed", "; ".join(f"{r['vm']}: {r['action']}" for r in fixed))
                self.journal.decide("resume", None, {"plan": p["id"], "steps": p["steps"]}, {"fixed": fixed})
                out.append({"plan": p["id"], "fixed": fixed})
        return out

    def _reconcile_move(self, ex: Executor, hosts: Mapping[str, HostEntry], st: dict[str, Any]) -> dict[str, Any]:
        vm, src, dst = st["vm"], st["step"]["from"], st["step"]["to"]
        deadline = time.monotonic() + self.cfg.resume_wait_s
        aborted = False
        while True:
            present = {h: s for h in hosts if (s := ex.locate(hosts[h], vm)) is not None}
            if len(present) == 1 or time.monotonic() > deadline:
                break
            if len(present) > 1 and src in present and not aborted:
                # The source libvirtd may still be sending (its worker outlives our connection):
                # cancel that migration; libvirt then removes the incoming domain.
                ex.remote.abort_job(hosts[src].libvirt_uri, vm)
                aborted = True
            time.sleep(1.0)
        if not present:
            return {"vm": vm, "state": "lost", "action": "on no host that answers", "hosts": sorted(hosts)}
        if len(present) > 1:
            keep = dst if present.get(dst) == "running" else src
            for h in present:
                if h != keep:
                    ex.remote.remove(hosts[h].libvirt_uri, vm)
        else:
            keep = next(iter(present))
        ex.remote.resume_if_paused(hosts[keep].libvirt_uri, vm)
        ex.remote.ensure_persistent(hosts[keep].libvirt_uri, vm)
        # Exactly one daemon has it: the one of the host it runs on.
        reg = {}
        for h, e in hosts.items():
            try:
                reg[h] = ex.view(e, vm) is not None
            except ValueError:
                reg[h] = False
        from symbiont.placement.execute import _client

        for h, is_reg in reg.items():
            if is_reg and h != keep:
                with _client(hosts[h].daemon) as c:
                    c.delete(f"/v1/vms/{vm}")
        registered = reg.get(keep, False)
        policy = (st.get("context") or {}).get("policy")
        if not registered and hosts[keep].daemon and policy is not None:
            with _client(hosts[keep].daemon) as c:
                c.post("/v1/vms", {"name": vm, **policy})
            registered = True
        state = "completed" if keep == dst else "rolled-back"
        return {"vm": vm, "state": state, "on": keep, "registered": registered,
                "action": f"{'migration finished' if keep == dst else 'migration rolled back'}: runs on {keep}"}  # fmt: skip


def _sd(s: Step) -> dict[str, Any]:
    return s.to_dict()


def _what(s: Step) -> str:
    return f"move of {s.vm}" if isinstance(s, MoveSpec) else f"{s.kind} of {s.vm}"
