"""YAML configuration of the daemon and the lab, validated before anything starts.

Every error names the key (``control.period_s``) and the reason. Unknown keys are errors
too: a typo must not silently fall back to a default. Each part brings its own section
(``symbiont/<part>/config.py`` defines ``CONFIG``, a dataclass with ``validate(key)``), found by
discovery: this module imports no part.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def _check(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {reason}")


check = _check  # for the parts' config sections


def section_classes() -> dict[str, type]:
    """The parts' config sections: ``CONFIG`` of every ``symbiont.<part>.config`` module.
    Discovered (:mod:`symbiont.plugins`), so this module imports no part."""
    from symbiont.plugins import part_modules

    out = {}
    for part, mod in part_modules("config").items():
        cls = getattr(mod, "CONFIG", None)
        if cls is None or not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{mod.__name__}: CONFIG must name the part's config dataclass")
        out[part] = cls
    return out


@dataclass
class ControlConfig:
    period_s: float = 5.0  # how often the control loop collects stats
    agent_timeout_s: float = 5.0  # a request to an agent fails after this long
    history_keep_s: float = 7 * 86400.0  # stats older than this are pruned
    # > 0: a VM whose QEMU used < 5 % of a core last period is asked for agent stats at most this
    # often (its last sample stands in between); 0: every period
    idle_stats_s: float = 0.0

    def validate(self, key: str) -> None:
        _check(0.2 <= self.period_s <= 3600, f"{key}.period_s", "must be between 0.2 and 3600 seconds")
        _check(0.1 <= self.agent_timeout_s <= 600, f"{key}.agent_timeout_s", "must be between 0.1 and 600")
        _check(self.history_keep_s >= 60, f"{key}.history_keep_s", "must be at least 60 seconds")
        _check(0 <= self.idle_stats_s <= 3600, f"{key}.idle_stats_s", "must be between 0 (every period) and 3600")


@dataclass
class AgentConfig:
    frame_timeout_s: float = 10.0  # a frame must complete within this long once started
    max_json_bytes: int = 1 << 20
    max_binary_bytes: int = 16 << 20
    reconnect_max_s: float = 5.0  # back-off ceiling when a channel socket is gone
    channel_name: str = "org.symbiont.agent.0"

    def validate(self, key: str) -> None:
        _check(0.1 <= self.frame_timeout_s <= 600, f"{key}.frame_timeout_s", "must be between 0.1 and 600")
        _check(64 <= self.max_json_bytes <= 1 << 20, f"{key}.max_json_bytes", "must be between 64 and 1 MiB")
        _check(0 <= self.max_binary_bytes <= 16 << 20, f"{key}.max_binary_bytes", "must be at most 16 MiB")
        _check(0.1 <= self.reconnect_max_s <= 300, f"{key}.reconnect_max_s", "must be between 0.1 and 300")
        _check(bool(self.channel_name), f"{key}.channel_name", "must not be empty")


@dataclass
class LabConfig:
    domain_type: str = "auto"  # auto: kvm where the CPU has vmx/svm and /dev/kvm works, else qemu (TCG)
    vm_prefix: str = "symbiont-lab-"
    memory_mib: int = 512  # boot memory (the balloon's ceiling)
    vcpus: int = 1
    max_vcpus: int = 4
    # virtio-balloon stats period; 0: off. The agent reports the guest's memory; at 2 s the stats
    # woke an idle TCG guest for 0.5 % of a host core (benchmarks/bench_idle_guest.py)
    balloon_period_s: int = 0
    tcg_tb_cache_mib: int = 32  # TCG translation cache per VM (QEMU tb-size; domain type qemu only); 0: QEMU's default
    images_dir: str = "/var/lib/symbiont/images"
    vms_dir: str = "/var/lib/symbiont/vms"
    channels_dir: str = "/var/lib/symbiont/channels"
    cache_dir: str = "/var/cache/symbiont"
    mirror: str = ""  # Debian mirror for the image; empty: the host's apt mirror

    def validate(self, key: str) -> None:
        _check(self.domain_type in ("auto", "kvm", "qemu"), f"{key}.domain_type", "must be auto, kvm or qemu")
        _check(bool(self.vm_prefix) and "/" not in self.vm_prefix, f"{key}.vm_prefix", "must be a plain name")
        _check(128 <= self.memory_mib <= 1 << 20, f"{key}.memory_mib", "must be between 128 and 1048576")
        _check(1 <= self.vcpus <= 256, f"{key}.vcpus", "must be between 1 and 256")
        _check(self.vcpus <= self.max_vcpus <= 256, f"{key}.max_vcpus", "must be between vcpus and 256")
        _check(0 <= self.balloon_period_s <= 3600, f"{key}.balloon_period_s", "must be between 0 and 3600")
        _check(0 <= self.tcg_tb_cache_mib <= 4096, f"{key}.tcg_tb_cache_mib",
               "must be between 0 (QEMU's default) and 4096 MiB")


@dataclass
class Config:
    state_dir: str = "/var/lib/symbiont"
    socket: str = "/run/symbiont/symbiontd.sock"
    socket_mode: int = 0o660
    socket_group: str = ""  # group owning the API socket; empty: the daemon's group
    libvirt_uri: str = "qemu:///system"
    log_level: str = "INFO"
    restore_on_exit: bool = True  # every knob turned is restored on stop / unregister
    profile: str = ""  # a named set of defaults under this file's keys (symbiont.profiles): overcommit
    control: ControlConfig = field(default_factory=ControlConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    lab: LabConfig = field(default_factory=LabConfig)
    # One section per part that has a config (``symbiont/<part>/config.py``, ``CONFIG``), by
    # part name: discovered, not listed here. ``cfg.memory.enabled`` reads ``sections["memory"]``.
    sections: dict[str, Any] = field(default_factory=lambda: {n: c() for n, c in section_classes().items()})

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not attributes: a part's section.
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"Config has no section or key {name!r}")

    def validate(self, key: str = "") -> None:
        _check(self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level", "must be DEBUG, INFO, WARNING or ERROR")
        _check(0 <= self.socket_mode <= 0o777, "socket_mode", "must be an octal file mode such as 0660")
        _check(os.path.isabs(self.socket), "socket", "must be an absolute path")
        _check(os.path.isabs(self.state_dir), "state_dir", "must be an absolute path")
        if self.socket_group:
            try:
                grp.getgrnam(self.socket_group)
            except KeyError:
                raise ConfigError(f"socket_group: no group {self.socket_group!r} on this host") from None
        self.control.validate("control")
        self.agent.validate("agent")
        self.lab.validate("lab")
        for name, section in self.sections.items():
            section.validate(name)

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir) / "symbiont.sqlite3"


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        _check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if key.endswith("socket_mode") and isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ConfigError(f"{key}: must be an octal mode such as \"0660\", got {value!r}") from None
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    return value


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _convert(data[f.name], hints[f.name], where)
    return cls(**kwargs)


def _build_config(data: dict[str, Any]) -> Config:
    """The core keys through :func:`_build`; each part's section through its own dataclass."""
    classes = section_classes()
    core = {k: v for k, v in data.items() if k not in classes}
    if "sections" in core:
        raise ConfigError("sections: unknown key (a part's section is written under the part's name)")
    try:
        cfg = _build(Config, core, "")
    except ConfigError as exc:
        if ": unknown key (known: " in str(exc) and "." not in str(exc).split(":", 1)[0]:
            known = sorted({f.name for f in dataclasses.fields(Config)} - {"sections"} | set(classes))
            raise ConfigError(f"{str(exc).split(':', 1)[0]}: unknown key (known: {', '.join(known)})") from None
        raise
    for name, cls in classes.items():
        if name in data:
            cfg.sections[name] = _convert(data[name], cls, name)
    return cfg


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice: YAML would silently keep the last one."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys, naming the key path and the line."""

    def construct_document(self, node: yaml.Node) -> Any:
        _no_duplicates(node, "")
        return super().construct_document(node)


def _no_duplicates(node: yaml.Node, where: str) -> None:
    stack: list[tuple[yaml.Node, str]] = [(node, where)]
    seen_nodes: set[int] = set()
    while stack:
        n, at = stack.pop()
        if id(n) in seen_nodes:  # an alias: checked once
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict[Any, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    ident = (k.tag, k.value)
                    key = f"{at}.{k.value}" if at else k.value
                    if ident in first:
                        raise DuplicateKeyError(f"{key}: duplicate key (line {k.start_mark.line + 1}; first on line "
                                                f"{first[ident]})")
                    first[ident] = k.start_mark.line + 1
                    stack.append((v, key))
                else:
                    stack.append((v, at))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(n.value))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a config file (``None``: all defaults)."""
    data: Any = {}
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{path}: not UTF-8: byte {exc.start} (line {line}) is {raw[exc.start]:#04x}") from None
        try:
            data = yaml.load(text, Loader=_StrictLoader) or {}
        except DuplicateKeyError as exc:
            raise ConfigError(f"{exc} in {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    if overrides:
        data = merge_dicts(data, overrides)
    from symbiont.profiles import apply

    data = apply(data)  # the profile's defaults under the user's keys
    cfg = _build_config(data)
    cfg.validate()
    return cfg


def merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def dump_default_config(profile: str = "") -> str:
    """The defaults as YAML; with ``profile``, the defaults that profile gives."""
    from symbiont.profiles import apply

    cfg = _build_config(apply({"profile": profile})) if profile else Config()
    d = dataclasses.asdict(cfg)
    sections = d.pop("sections")
    d.update(sections)
    for section in (d, *(v for v in d.values() if isinstance(v, dict))):
        for k, v in section.items():
            if k.endswith("socket_mode") and isinstance(v, int):
                section[k] = f"{v:04o}"
    return yaml.safe_dump(d, sort_keys=False)
