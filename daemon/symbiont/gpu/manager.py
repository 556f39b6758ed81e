"""The GPU part's state inside the daemon: registered GPUs, endpoint clients and their quotas,
FaaS workloads and their results, kept in the daemon's sqlite and mirrored in the live
endpoint services.

Why sqlite: a daemon restart (``kill -9`` included) must keep what users registered. Every
change is written in a transaction whose *last* step applies it to the live service, so a
change the service refuses rolls the row back (nothing changed), and a row exists only for a
change the service accepted. On start the manager re-declares the configured devices,
re-registers the GPUs added through the API, re-applies every client's quotas (SM share,
memory, critical) and marks workloads a crash interrupted. Device memory does not survive a
daemon restart: clients reconnect, find their quotas, and upload their buffers again (as after
a GPU reset).

Two kinds of GPU can be registered side by side: ``simulated`` (the discrete-event model) and
``cupy`` (a CUDA device). Each kind has one backend and one :class:`GpuEndpointService`; the
daemon's endpoint socket routes a client to the service that holds it.

Ids: configured simulated devices are ``sim0, sim1, ...`` (in config order), CUDA devices
declared by the ``cupy`` backend ``cuda0, ...``; GPUs added through the API ``gpu0, gpu1, ...``
(never reused). Workloads are ``w0, w1, ...``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from symbiont.errors import Conflict, Invalid, NotFound, Unavailable
from symbiont.gpu import backend as gb
from symbiont.gpu import metrics
from symbiont.gpu.endpoint import EndpointError, GpuEndpointService, MigrationResult, ScaleResult
from symbiont.gpu.faas import BackgroundLoad, Task, run_trace
from symbiont.gpu.simulated import DeviceConfig, SimulatedBackend, gpu_type

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS gpu_devices (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    spec TEXT NOT NULL,
    registered_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_clients (
    name TEXT PRIMARY KEY,
    gpu TEXT NOT NULL,
    sm_share REAL NOT NULL,
    mem_bytes INTEGER NOT NULL,
    critical INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gpu_workloads (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    gpu TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    summary TEXT,
    tasks TEXT,
    error TEXT,
    submitted_at REAL NOT NULL,
    finished_at REAL
);
"""

#: Endpoint error codes -> HTTP errors (the rest are bad requests: 422).
_STATUS = {"unknown_client": NotFound, "unknown_device": NotFound, "exists": Conflict,
           "over_capacity": Conflict, "out_of_memory": Conflict}  # fmt: skip


def http_error(exc: EndpointError) -> Exception:
    """The API error for an endpoint error, with its code in the reason."""
    return _STATUS.get(exc.code, Invalid)(f"{exc.code}: {exc.message}")


@dataclass
class RegisteredGpu:
    id: str
    kind: str  # simulated | cupy
    index: int  # device index in the kind's backend
    spec: dict[str, Any]  # simulated: type, server, sharing; cupy: index
    source: str  # config | api

    def config(self) -> DeviceConfig | None:
        if self.kind != "simulated":
            return None
        return DeviceConfig(self.spec["type"], server=self.spec["server"], sched=self.spec["sharing"])


class GpuManager:
    """GPUs, clients and workloads: sqlite first, then the live services (see module doc)."""

    def __init__(self, store: Any, backend: str = "auto", devices: list[dict[str, Any]] | None = None,
                 default_sm_share: float = 1.0, default_mem_bytes: int = 1 << 30, seed: int = 0) -> None:  # fmt: skip
        self.store = store
        self.requested_backend = backend
        self.declared = list(devices or [])
        self.default_sm_share = default_sm_share
        self.default_mem_bytes = default_mem_bytes
        self.seed = seed
        self.gpus: dict[str, RegisteredGpu] = {}
        self.backends: dict[str, gb.GpuBackend] = {}
        self.services: dict[str, GpuEndpointService] = {}
        self.orphans: dict[str, dict[str, Any]] = {}  # client rows whose GPU is gone, with why
        self.backend_name = ""  # the resolved default backend: simulated | cupy
        self.server: Any = None  # the EndpointServer, when the controller runs one
        store.ensure_schema(SCHEMA)

    # -- backends -------------------------------------------------------------------------
    def _backend(self, kind: str) -> gb.GpuBackend:
        b = self.backends.get(kind)
        if b is not None:
            return b
        if kind == "simulated":
            b = SimulatedBackend(devices=(), seed=self.seed)
        else:
            ok, why = gb.cupy_status()
            if not ok:
                raise Conflict(f"no real GPU here: {why}")
            from symbiont.gpu.cupy_backend import CupyBackend

            b = CupyBackend()
        self.backends[kind] = b
        self.services[kind] = GpuEndpointService(b)
        return b

    def service(self, kind: str) -> GpuEndpointService:
        self._backend(kind)
        return self.services[kind]

    def resolve(self, name: str) -> GpuEndpointService:
        """The service holding client ``name`` (for the endpoint socket)."""
        for svc in self.services.values():
            if name in svc.clients:
                return svc
        raise EndpointError("unknown_client", f"no client named {name!r}")

    # -- start: declare, reload, re-apply -------------------------------------------------
    def load(self) -> None:
        """Declare the configured devices, reload API-registered GPUs and clients from sqlite."""
        want = self.requested_backend
        ok, why = gb.cupy_status() if want in ("auto", "cupy") else (False, "not requested")
        if want == "cupy" and not ok:
            raise Unavailable(f"gpu.backend is cupy but no CUDA device is usable: {why}")
        self.backend_name = "cupy" if ok else "simulated"
        if self.backend_name == "cupy":
            b = self._backend("cupy")
            for info in b.devices():
                gid = f"cuda{info.index}"
                self.gpus[gid] = RegisteredGpu(gid, "cupy", info.index, {"index": info.index}, "config")
        else:
            for i, d in enumerate(self.declared):
                spec = {"type": gpu_type(d["type"]).name, "server": d.get("server", "server0"),
                        "sharing": d.get("sharing", "spatial")}  # fmt: skip
                g = RegisteredGpu(f"sim{i}", "simulated", -1, spec, "config")
                g.index = self._sim_add(g)
                self.gpus[g.id] = g
        for row in self.store.query("SELECT * FROM gpu_devices ORDER BY seq"):
            spec = json.loads(row["spec"])
            g = RegisteredGpu(row["id"], row["kind"], -1, spec, "api")
            try:
                if g.kind == "simulated":
                    g.index = self._sim_add(g)
                else:
                    g.index = self._cupy_index(spec["index"])
            except (Conflict, NotFound) as exc:
                log.warning("gpu %s (%s) not restored: %s", g.id, spec, exc)
                self.store.log_decision(
                    "gpu", "restore-gpu", None, {"gpu": g.id, "spec": spec}, {"error": str(exc)}
                )
                continue
            self.gpus[g.id] = g
        for row in self.store.query("SELECT * FROM gpu_clients ORDER BY created_at, name"):
            rec = {"gpu": row["gpu"], "sm_share": row["sm_share"], "mem_bytes": row["mem_bytes"],
                   "critical": bool(row["critical"])}  # fmt: skip
            g = self.gpus.get(row["gpu"])
            try:
                if g is None:
                    raise NotFound(f"its GPU {row['gpu']!r} is not registered any more")
                self.service(g.kind).register_client(row["name"], g.index, rec["sm_share"], rec["mem_bytes"],
                                                     rec["critical"])  # fmt: skip
                outcome: dict[str, Any] = {"restored": True}
            except (EndpointError, Conflict, NotFound) as exc:
                why = exc.message if isinstance(exc, EndpointError) else str(exc)
                self.orphans[row["name"]] = {**rec, "reason": why}
                log.warning("gpu client %s not restored: %s", row["name"], why)
                outcome = {"restored": False, "reason": why}
            self.store.log_decision("gpu", "restore-client", None, {"client": row["name"], **rec}, outcome)
        with self.store.transaction() as db:
            n = db.execute("UPDATE gpu_workloads SET status = 'interrupted', finished_at = ?, "
                           "error = 'the daemon stopped while it ran' WHERE status = 'running'",
                           (time.time(),)).rowcount  # fmt: skip
        if n:
            self.store.log_decision("gpu", "interrupted-workloads", None, {}, {"count": n})
        self.refresh_metrics()
        log.info("gpu: backend %s, %d GPUs, %d clients restored, %d orphaned", self.backend_name, len(self.gpus),
                 sum(len(s.clients) for s in self.services.values()), len(self.orphans))  # fmt: skip

    def _sim_add(self, g: RegisteredGpu) -> int:
        cfg = g.config()
        assert cfg is not None
        return self._backend("simulated").add_device(cfg)  # type: ignore[attr-defined]

    def _cupy_index(self, index: int) -> int:
        b = self._backend("cupy")
        if not (0 <= index < len(b.devices())):
            raise NotFound(f"no CUDA device {index} (have {len(b.devices())})")
        if any(g.kind == "cupy" and g.index == index for g in self.gpus.values()):
            raise Conflict(f"CUDA device {index} is already registered")
        return index

    def refresh_metrics(self) -> None:
        metrics.DEVICES.clear()
        for g in self.gpus.values():
            info = self.backends[g.kind].devices()[g.index]
            metrics.DEVICES.labels(g.kind, info.gpu_type.name).inc()
        metrics.CLIENTS.clear()
        for g in self.gpus.values():
            metrics.CLIENTS.labels(g.id).set(len(self.clients_on(g)))
        metrics.WORKLOADS.clear()
        for row in self.store.query("SELECT status, COUNT(*) AS n FROM gpu_workloads GROUP BY status"):
            metrics.WORKLOADS.labels(row["status"]).set(row["n"])

    # -- GPUs ---------------------------------------------------------------------------------
    def gpu(self, gpu_id: str) -> RegisteredGpu:
        g = self.gpus.get(gpu_id)
        if g is None:
            raise NotFound(f"unknown GPU {gpu_id!r}")
        return g

    def gpu_view(self, g: RegisteredGpu) -> dict[str, Any]:
        info = self.backends[g.kind].devices()[g.index]
        return {"id": g.id, "kind": g.kind, "source": g.source, **info.as_dict()}

    def clients_on(self, g: RegisteredGpu) -> list[dict[str, Any]]:
        svc = self.services.get(g.kind)
        return [c.info() for c in svc.clients.values() if c.device == g.index] if svc else []

    def register_gpu(self, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Add a GPU (persisted); ``spec``: simulated {type, server, sharing}, cupy {index}."""
        if kind == "simulated":
            spec = {"type": gpu_type(spec["type"]).name, "server": spec["server"], "sharing": spec["sharing"]}
            DeviceConfig(spec["type"], server=spec["server"], sched=spec["sharing"])  # validates
        else:
            spec = {"index": int(spec["index"])}
            self._cupy_index(spec["index"])  # 409 without a GPU, 404/409 for a bad index
        with self.store.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM gpu_devices").fetchone()[0]
            gid = f"gpu{seq}"
            db.execute("INSERT INTO gpu_devices (id, seq, kind, spec, registered_at) VALUES (?, ?, ?, ?, ?)",
                       (gid, seq, kind, json.dumps(spec), time.time()))  # fmt: skip
            g = RegisteredGpu(gid, kind, -1, spec, "api")
            g.index = self._sim_add(g) if kind == "simulated" else spec["index"]  # last: a failure rolls back
        self.gpus[gid] = g
        self.store.log_decision("gpu", "register-gpu", None, {"kind": kind, "spec": spec}, {"id": gid})
        self.refresh_metrics()
        return self.gpu_view(g)

    # -- clients and quotas ----------------------------------------------------------------
    def _find(self, name: str) -> tuple[GpuEndpointService, RegisteredGpu] | None:
        for kind, svc in self.services.items():
            c = svc.clients.get(name)
            if c is not None:
                g = next(g for g in self.gpus.values() if g.kind == kind and g.index == c.device)
                return svc, g
        return None

    def client(self, name: str) -> tuple[GpuEndpointService, RegisteredGpu]:
        found = self._find(name)
        if found is None:
            if name in self.orphans:
                raise Conflict(f"client {name!r} was not restored ({self.orphans[name]['reason']}); "
                               "give it a 'gpu' again or delete it")  # fmt: skip
            raise NotFound(f"unknown client {name!r}")
        return found

    def client_view(self, name: str) -> dict[str, Any]:
        svc, g = self.client(name)
        st = svc.scale_status(name)
        return {**svc.clients[name].info(), "gpu": g.id, "last_scale": st.as_dict() if st else None}

    def list_clients(self) -> list[dict[str, Any]]:
        out = []
        for svc in self.services.values():
            for name in svc.clients:
                out.append(self.client_view(name))
        out += [{"client": n, "state": "orphaned", **rec} for n, rec in self.orphans.items()]
        return out

    def set_client(self, name: str, gpu: str | None, sm_share: float | None, mem_bytes: int | None,
                   critical: bool | None) -> dict[str, Any]:  # fmt: skip
        """Create a client with quotas, or change them (a share change is a vertical scaling)."""
        if not (1 <= len(name) <= 64):
            raise Invalid("client name must be 1..64 characters")
        found = self._find(name)
        now = time.time()
        if found is None:
            if gpu is None:
                raise Invalid("a new client needs 'gpu'")
            g = self.gpu(gpu)
            svc = self.service(g.kind)
            share = self.default_sm_share if sm_share is None else sm_share
            mem = self.default_mem_bytes if mem_bytes is None else mem_bytes
            crit = bool(critical)
            try:
                with self.store.transaction() as db:
                    db.execute("INSERT OR REPLACE INTO gpu_clients (name, gpu, sm_share, mem_bytes, critical, "
                               "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (name, g.id, share, mem, int(crit), now, now))  # fmt: skip
                    svc.register_client(name, g.index, share, mem, crit)  # last: a refusal rolls back
            except EndpointError as exc:
                raise http_error(exc) from None
            self.orphans.pop(name, None)
            self.store.log_decision("gpu", "client-create", None,
                                    {"client": name, "gpu": g.id, "sm_share": share, "mem_bytes": mem,
                                     "critical": crit}, {"effective_share": svc.clients[name].effective_share})  # fmt: skip
            self.refresh_metrics()
            return {"created": True, "client": {**svc.clients[name].info(), "gpu": g.id}, "scale": None}
        svc, g = found
        if gpu is not None and gpu != g.id:
            raise Invalid(f"client {name!r} is on {g.id}; use POST /clients/{name}/migrate to move it")
        c = svc.clients[name]
        before = {"sm_share": c.sm_share, "mem_bytes": c.mem_quota, "critical": c.critical,
                  "effective_share": c.effective_share}  # fmt: skip
        try:
            with self.store.transaction() as db:
                db.execute("UPDATE gpu_clients SET sm_share = ?, mem_bytes = ?, critical = ?, updated_at = ? "
                           "WHERE name = ?",
                           (c.sm_share if sm_share is None else sm_share, c.mem_quota if mem_bytes is None else mem_bytes,
                            int(c.critical if critical is None else critical), now, name))  # fmt: skip
                res: ScaleResult | None = svc.set_quota(
                    name, sm_share, mem_bytes, critical
                )  # last: see above
        except EndpointError as exc:
            raise http_error(exc) from None
        self.store.log_decision("gpu", "client-quota", None,
                                {"client": name, "gpu": g.id, "before": before,
                                 "request": {"sm_share": sm_share, "mem_bytes": mem_bytes, "critical": critical}},
                                {"effective_share": c.effective_share, "scale": res.as_dict() if res else None})  # fmt: skip
        self.refresh_metrics()
        return {
            "created": False,
            "client": {**c.info(), "gpu": g.id},
            "scale": res.as_dict() if res else None,
        }

    def delete_client(self, name: str) -> None:
        found = self._find(name)
        if found is None and name not in self.orphans:
            raise NotFound(f"unknown client {name!r}")
        with self.store.transaction() as db:
            db.execute("DELETE FROM gpu_clients WHERE name = ?", (name,))
            if found is not None:
                found[0].remove_client(name)
        self.orphans.pop(name, None)
        self.store.log_decision("gpu", "client-delete", None, {"client": name}, {})
        self.refresh_metrics()

    async def migrate(self, name: str, gpu: str) -> dict[str, Any]:
        """Horizontal scaling: move ``name`` with its buffers to ``gpu`` (its requests wait)."""
        svc, src = self.client(name)
        dst = self.gpu(gpu)
        if dst.kind != src.kind:
            raise Invalid("migration between a simulated and a real GPU is not possible")
        lock = self.server.client_lock(name) if self.server is not None else None
        if lock is not None:
            await lock.acquire()
        try:
            with self.store.transaction() as db:
                db.execute(
                    "UPDATE gpu_clients SET gpu = ?, updated_at = ? WHERE name = ?",
                    (dst.id, time.time(), name),
                )
                res: MigrationResult = svc.migrate(name, dst.index)  # last: a failure rolls back
        except EndpointError as exc:
            raise http_error(exc) from None
        finally:
            if lock is not None:
                lock.release()
        out = {**res.as_dict(), "src_gpu": src.id, "dst_gpu": dst.id}
        self.store.log_decision(
            "gpu", "client-migrate", None, {"client": name, "from": src.id, "to": dst.id}, out
        )
        self.refresh_metrics()
        return out

    # -- workloads -----------------------------------------------------------------------------
    def workload_start(self, gpu: str, params: dict[str, Any]) -> tuple[str, RegisteredGpu]:
        """Record a workload as running (so a crash leaves 'interrupted', not nothing)."""
        g = self.gpu(gpu)
        with self.store.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM gpu_workloads").fetchone()[0]
            wid = f"w{seq}"
            db.execute("INSERT INTO gpu_workloads (id, seq, gpu, params, status, submitted_at) "
                       "VALUES (?, ?, ?, ?, 'running', ?)", (wid, seq, g.id, json.dumps(params), time.time()))  # fmt: skip
        return wid, g

    def workload_backend(self, g: RegisteredGpu, seed: int) -> tuple[gb.GpuBackend, int]:
        """A backend of its own for a workload: a fresh simulator of the GPU's type and sharing
        mode (reproducible, independent of endpoint clients), or a second CuPy backend object on
        the real device (no Python state shared with the endpoint; the device itself is shared)."""
        cfg = g.config()
        if cfg is not None:
            return SimulatedBackend([cfg], seed=seed), 0
        from symbiont.gpu.cupy_backend import CupyBackend

        return CupyBackend(), g.index

    @staticmethod
    def run_workload(backend: gb.GpuBackend, device: int, tasks: list[Task], params: dict[str, Any]) -> Any:
        """Run to completion (called in a worker thread: it touches no shared state)."""
        bg = (BackgroundLoad(vms=params["background_vms"], duty=params["duty"], seed=params["seed"] + 1)
              if params["background_vms"] else None)  # fmt: skip
        return run_trace(backend, tasks, params["scheduler"], device=device, share=params["share"],
                         drop=params["drop"], background=bg)  # fmt: skip

    def workload_done(self, wid: str, g: RegisteredGpu, params: dict[str, Any], r: Any) -> dict[str, Any]:
        summary = r.summary()
        with self.store.transaction() as db:
            db.execute("UPDATE gpu_workloads SET status = 'done', summary = ?, tasks = ?, finished_at = ? WHERE id = ?",
                       (json.dumps(summary), json.dumps(r.rows), time.time(), wid))  # fmt: skip
        for outcome, n in (("met", r.met), ("missed", r.missed), ("dropped", r.dropped)):
            metrics.FAAS_TASKS.labels(r.scheduler, outcome).inc(n)
        metrics.FAAS_WASTED_GFLOP.labels(r.scheduler).inc(r.wasted_gflop)
        self.store.log_decision("gpu", "workload", None, {"id": wid, "gpu": g.id, **params}, summary)
        self.refresh_metrics()
        return {"id": wid, "gpu": g.id, "status": "done", "summary": summary}

    def workload_failed(self, wid: str) -> None:
        """A run that failed on valid input leaves no trace (nothing changed); the caller says why."""
        with self.store.transaction() as db:
            db.execute("DELETE FROM gpu_workloads WHERE id = ?", (wid,))

    def workloads(self) -> list[dict[str, Any]]:
        rows = self.store.query("SELECT id, gpu, status, summary, error, submitted_at, finished_at "
                                "FROM gpu_workloads ORDER BY seq")  # fmt: skip
        return [_workload(r, with_tasks=False) for r in rows]

    def workload(self, wid: str) -> dict[str, Any]:
        rows = self.store.query("SELECT * FROM gpu_workloads WHERE id = ?", (wid,))
        if not rows:
            raise NotFound(f"unknown workload {wid!r}")
        return _workload(rows[0], with_tasks=True)


def _workload(r: Any, with_tasks: bool) -> dict[str, Any]:
    out = {"id": r["id"], "gpu": r["gpu"], "status": r["status"],
           "summary": json.loads(r["summary"]) if r["summary"] else None, "error": r["error"],
           "submitted_at": r["submitted_at"], "finished_at": r["finished_at"]}  # fmt: skip
    if with_tasks:
        out["params"] = json.loads(r["params"])
        out["tasks"] = json.loads(r["tasks"]) if r["tasks"] else []
    return out
