"""The experiment framework: one command runs a scenario and leaves CSV, PNG and a JSON record.

An experiment is a plain function ``run(ctx: RunContext) -> dict`` registered with
:func:`experiment`. ``symbiont experiment run NAME --set key=value`` calls it with the
parameters (defaults overridden, each coerced to its default's type), a results folder
``results/NAME/TIMESTAMP/`` and a progress bar. The record ``run.json`` holds the parameters,
the summary the function returns, package versions and host facts, so a plot can always be
traced back to how it was made.
"""

from __future__ import annotations

import contextvars
import csv
import datetime as dt
import importlib
import json
import logging
import os
import pkgutil
import platform
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ExperimentError(Exception):
    """A user-facing error: bad parameter, unknown experiment, missing prerequisite."""


@dataclass(frozen=True)
class Experiment:
    """A registered experiment."""

    name: str
    summary: str
    run: Callable[[RunContext], Mapping[str, Any] | None]
    params: Mapping[str, Any] = field(default_factory=dict)
    param_help: Mapping[str, str] = field(default_factory=dict)
    # What it needs from the host: subset of {"root", "libvirt", "vm", "gpu"}.
    needs: frozenset[str] = frozenset()
    part: str = ""


_REGISTRY: dict[str, Experiment] = {}


def experiment(
    name: str,
    summary: str,
    params: Mapping[str, Any] | None = None,
    param_help: Mapping[str, str] | None = None,
    needs: Iterable[str] = (),
) -> Callable[[Callable[[RunContext], Any]], Callable[[RunContext], Any]]:
    """Register ``fn`` as experiment ``name`` with default ``params``."""

    def register(fn: Callable[[RunContext], Any]) -> Callable[[RunContext], Any]:
        if name in _REGISTRY and _REGISTRY[name].run is not fn:
            raise ExperimentError(f"experiment {name!r} registered twice")
        part = _part_of(fn.__module__)
        _REGISTRY[name] = Experiment(
            name=name,
            summary=summary,
            run=fn,
            params=dict(params or {}),
            param_help=dict(param_help or {}),
            needs=frozenset(needs),
            part=part,
        )
        return fn

    return register


def _part_of(module: str) -> str:
    """The part an experiment belongs to: ``symbiont_research.experiments.<part>`` gives
    ``<part>``; the demo (and the framework) give ``experiments``, as before the move."""
    pkg = "symbiont_research.experiments."
    if not module.startswith(pkg):
        return ""
    name = module[len(pkg):].split(".")[0]
    return "experiments" if name in ("demo", "framework") else name


def registry() -> dict[str, Experiment]:
    """All experiments, after importing every module of :mod:`symbiont_research.experiments`
    (one per part, plus the demo). A module that fails to import is an error, not skipped."""
    import symbiont_research.experiments as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")
    return dict(sorted(_REGISTRY.items()))


def coerce_params(exp: Experiment, overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides, coercing each value to the type of its default."""
    params = dict(exp.params)
    for item in overrides:
        if "=" not in item:
            raise ExperimentError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in params:
            known = ", ".join(sorted(params)) or "(none)"
            raise ExperimentError(f"--set {key}: unknown parameter of {exp.name}; known: {known}")
        params[key] = _coerce(key, raw, params[key])
    return params


def _coerce(key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, (list, tuple)):
            elem = type(default[0]) if default else str
            return [elem(x) for x in raw.split(",") if x.strip()]
        return raw
    except ValueError as exc:
        raise ExperimentError(f"--set {key}={raw!r}: {exc}") from exc


class RunContext:
    """What an experiment gets: parameters, an output folder, progress and writers."""

    def __init__(
        self,
        exp: Experiment,
        params: Mapping[str, Any],
        out_dir: Path,
        progress: Any | None = None,
    ) -> None:
        self.experiment = exp
        self.params = dict(params)
        self.out_dir = out_dir
        self._progress = progress
        self._task: Any = None
        self.files: list[str] = []
        self.notes: list[str] = []
        self.echo = progress is None and os.environ.get("SYMBIONT_QUIET") != "1"
        self.run_id = secrets.token_hex(3)
        # VM prefixes of the lab sessions this run started (LabSession names its VMs after
        # the experiment and a run id of its own, so two runs never share a domain name).
        self.lab_prefixes: list[str] = []

    # -- progress -------------------------------------------------------------------------
    def stage(self, description: str, total: float | None = None) -> None:
        """Start a new stage of the progress bar (``total`` steps, or indeterminate)."""
        log.info("[%s] %s", self.experiment.name, description)
        if self._progress is None:
            if self.echo:
                print(f"- {description}", flush=True)
            return
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[self._task].total or 0)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, steps: float = 1.0) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    def note(self, text: str) -> None:
        """A line for the report (also logged)."""
        log.info("[%s] %s", self.experiment.name, text)
        self.notes.append(text)
        if self._progress is not None:
            self._progress.console.print(f"  {text}", highlight=False)
        elif self.echo:
            print(f"  {text}", flush=True)

    # -- outputs --------------------------------------------------------------------------
    def path(self, filename: str) -> Path:
        p = self.out_dir / filename
        self.files.append(filename)
        return p

    def write_csv(self, filename: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        rows = list(rows)
        p = self.path(filename)
        fields: list[str] = []
        for r in rows:
            for k in r:
                if k not in fields:
                    fields.append(k)
        with p.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        return p

    def savefig(self, fig: Any, filename: str) -> Path:
        p = self.path(filename)
        fig.savefig(p, dpi=110, bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        return p


_CURRENT: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("symbiont_run", default=None)


def current_run() -> RunContext | None:
    """The experiment run in progress in this context (LabSession tags its VMs with it)."""
    return _CURRENT.get()


def host_facts() -> dict[str, Any]:
    """Facts about the machine an experiment ran on, for the record."""
    import psutil

    cpu_flags = ""
    try:
        cpu_flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "mem_total_bytes": psutil.virtual_memory().total,
        "hw_virt": (" vmx" in cpu_flags) or (" svm" in cpu_flags),
        "python": sys.version.split()[0],
    }


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out: dict[str, str] = {}
    for name in ("symbiont", "libvirt-python", "numpy", "scipy", "matplotlib", "psutil", "fastapi"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    for tool, args in (("qemu", ["qemu-system-x86_64", "--version"]), ("libvirt", ["libvirtd", "--version"])):
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=5)
            out[tool] = res.stdout.splitlines()[0] if res.stdout else ""
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def run_experiment(
    name: str,
    overrides: Iterable[str] = (),
    results_root: Path = Path("results"),
    show_progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Run experiment ``name``; return its results folder and summary."""
    reg = registry()
    if name not in reg:
        raise ExperimentError(f"unknown experiment {name!r}; see 'symbiont experiment list'")
    exp = reg[name]
    params = coerce_params(exp, overrides)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = results_root / name / stamp
    out_dir.mkdir(parents=True, exist_ok=False)
    record: dict[str, Any] = {
        "experiment": name,
        "summary_text": exp.summary,
        "params": params,
        "started": dt.datetime.now(dt.UTC).isoformat(),
        "host": host_facts(),
        "versions": package_versions(),
    }
    t0 = time.monotonic()
    progress = None
    if show_progress:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()
        )
    ctx = RunContext(exp, params, out_dir, progress)
    record["run_id"] = ctx.run_id
    status = "failed"
    summary: dict[str, Any] = {}
    token = _CURRENT.set(ctx)
    try:
        if progress is not None:
            with progress:
                summary = dict(exp.run(ctx) or {})
        else:
            summary = dict(exp.run(ctx) or {})
        status = "ok"
    finally:
        _CURRENT.reset(token)
        record["status"] = status
        record["lab_prefixes"] = ctx.lab_prefixes
        record["duration_s"] = round(time.monotonic() - t0, 3)
        record["summary"] = summary
        record["notes"] = ctx.notes
        record["files"] = ctx.files
        (out_dir / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out_dir, summary
