"""YAML configuration of the daemon and the lab, validated before anything starts.

Every error names the key (``control.period_s``) and the reason. Unknown keys are errors
too: a typo must not silently fall back to a default. Parts add their own sections by
extending :class:`Config`.
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


@dataclass
class ControlConfig:
    period_s: float = 5.0  # how often the control loop collects stats
    agent_timeout_s: float = 5.0  # a request to an agent fails after this long
    history_keep_s: float = 7 * 86400.0  # stats older than this are pruned

    def validate(self, key: str) -> None:
        _check(0.2 <= self.period_s <= 3600, f"{key}.period_s", "must be between 0.2 and 3600 seconds")
        _check(0.1 <= self.agent_timeout_s <= 600, f"{key}.agent_timeout_s", "must be between 0.1 and 600")
        _check(self.history_keep_s >= 60, f"{key}.history_keep_s", "must be at least 60 seconds")


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
    balloon_period_s: int = 2  # virtio-balloon stats period
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


@dataclass
class MemoryConfig:
    """The ESX-style memory policy (part 'memory'); off unless enabled."""

    enabled: bool = False  # run the policy every control period (else balloons move on API calls only)
    budget_mib: int = 0  # memory all VMs may use together; 0: host MemTotal - reserve_mib
    reserve_mib: int = 2048  # kept for the host when budget_mib is 0
    free_target_mib: int = 0  # keep this much of the budget free
    max_step_mib: int = 128  # largest balloon change per VM per period
    chunk_mib: int = 16  # balloon changes smaller than this are not applied (no churn)
    tax_rate: float = 0.75  # default idle-memory tax τ (per VM: policy memory.tax_rate)
    safety_margin_mib: int = 64  # never balloon a guest below its used memory + this
    pressure_grant_mib: int = 64  # what a VM under pressure asks for per period
    psi_threshold: float = 10.0  # guest PSI memory some avg10 above this is pressure
    min_available_fraction: float = 0.10  # guest MemAvailable/MemTotal below this is pressure
    prepare_timeout_s: float = 10.0  # how long the guest may take to free memory before inflation

    def validate(self, key: str) -> None:
        _check(self.budget_mib >= 0, f"{key}.budget_mib", "must be >= 0 (0: derive from host memory)")
        _check(self.reserve_mib >= 0, f"{key}.reserve_mib", "must be >= 0")
        _check(self.free_target_mib >= 0, f"{key}.free_target_mib", "must be >= 0")
        _check(1 <= self.max_step_mib <= 1 << 20, f"{key}.max_step_mib", "must be between 1 and 1048576")
        _check(1 <= self.chunk_mib <= self.max_step_mib, f"{key}.chunk_mib", "must be between 1 and max_step_mib")
        _check(0.0 <= self.tax_rate < 1.0, f"{key}.tax_rate", "must be in [0, 1)")
        _check(0 <= self.safety_margin_mib <= 1 << 20, f"{key}.safety_margin_mib", "must be >= 0")
        _check(0 <= self.pressure_grant_mib <= 1 << 20, f"{key}.pressure_grant_mib", "must be >= 0")
        _check(0.0 <= self.psi_threshold <= 100.0, f"{key}.psi_threshold", "must be between 0 and 100")
        _check(0.0 <= self.min_available_fraction < 1.0, f"{key}.min_available_fraction", "must be in [0, 1)")
        _check(0.1 <= self.prepare_timeout_s <= 600, f"{key}.prepare_timeout_s", "must be between 0.1 and 600")


@dataclass
class SsdCacheConfig:
    """Elastic SSD caches (part 'ssdcache'); the pool itself is created through the API."""

    runtime_dir: str = ""  # NBD sockets; empty: /run/symbiont/ssdcache/<hash of state_dir>
    release_timeout_s: float = 3.0  # how long a guest may take to choose blocks to give back
    pool_dir: str = ""  # the only folder pool files may be in; empty: <state_dir>/ssdcache-pools
    # Block devices the API may turn into a pool (paths or globs, e.g. /dev/nvme1n1); empty: none.
    # A device is refused anyway while it or a partition is mounted, held or swap.
    allowed_devices: list[str] = field(default_factory=list)
    max_caches: int = 64  # registered caches at most
    size_overcommit: float = 4.0  # the caches' sizes may total at most this × the pool
    reserve_free_mib: int = 1024  # a new pool file must fit in the free space and leave this much

    def validate(self, key: str) -> None:
        _check(not self.runtime_dir or os.path.isabs(self.runtime_dir), f"{key}.runtime_dir",
               "must be an absolute path (or empty for the default)")
        _check(0.1 <= self.release_timeout_s <= 600, f"{key}.release_timeout_s", "must be between 0.1 and 600")
        _check(not self.pool_dir or os.path.isabs(self.pool_dir), f"{key}.pool_dir",
               "must be an absolute path (or empty for the default)")
        _check(not self.pool_dir or self.pool_dir.rstrip("/") != "", f"{key}.pool_dir", "must not be /")
        _check(isinstance(self.allowed_devices, list)
               and all(isinstance(d, str) and d.startswith("/dev/") for d in self.allowed_devices),
               f"{key}.allowed_devices", "must be a list of /dev/ paths or globs")
        _check(1 <= self.max_caches <= 4096, f"{key}.max_caches", "must be between 1 and 4096")
        _check(1.0 <= self.size_overcommit <= 64.0, f"{key}.size_overcommit", "must be between 1 and 64")
        _check(0 <= self.reserve_free_mib <= 1 << 24, f"{key}.reserve_free_mib", "must be between 0 and 16777216")


@dataclass
class GpuConfig:
    """The GPU part (Flyt endpoints, FaaS, dispatch); the endpoint server runs only when enabled."""

    enabled: bool = False  # start the GPU endpoint server with the daemon (else /v1/gpu answers 503)
    backend: str = "auto"  # auto: CuPy when a CUDA device is present, else the simulator; cupy|simulated force one
    # Simulated devices declared at start when the backend is the simulator (ids sim0, sim1, ...):
    # each {type: A100|V100|T4|H100, server: NAME, sharing: spatial|spatial-strict|timeslice-...}.
    # With CuPy every CUDA device is declared instead (ids cuda0, ...). More can be added through the API.
    devices: list[dict[str, Any]] = field(default_factory=lambda: [{"type": "A100"}])
    endpoint_socket: str = ""  # empty: gpu-endpoint.sock next to the API socket
    socket_mode: int = 0o660
    default_sm_share: float = 1.0  # quotas of a client created without them
    default_mem_mib: int = 1024
    seed: int = 0  # the simulator's jitter seed

    def validate(self, key: str) -> None:
        _check(self.backend in ("auto", "simulated", "cupy"), f"{key}.backend", "must be auto, simulated or cupy")
        _check(isinstance(self.devices, list), f"{key}.devices", "must be a list of {type, server, sharing}")
        for i, d in enumerate(self.devices):
            _check(isinstance(d, dict), f"{key}.devices[{i}]", "must be a mapping {type, server, sharing}")
            extra = set(d) - {"type", "server", "sharing"}
            _check(not extra, f"{key}.devices[{i}].{min(extra) if extra else ''}",
                   "unknown key (known: sharing, server, type)")
            _check("type" in d, f"{key}.devices[{i}].type", "is required")
            for k in d:
                _check(isinstance(d[k], str) and bool(d[k]), f"{key}.devices[{i}].{k}", "must be a non-empty string")
        if self.enabled and self.devices:
            from symbiont.gpu.simulated import GPU_TYPES, SCHED_MODES  # imports numpy: only when enabled

            for i, d in enumerate(self.devices):
                _check(d["type"].strip().upper() in GPU_TYPES, f"{key}.devices[{i}].type",
                       f"unknown GPU type {d['type']!r} (known: {', '.join(GPU_TYPES)})")
                _check(d.get("sharing", "spatial") in SCHED_MODES, f"{key}.devices[{i}].sharing",
                       f"must be one of {', '.join(SCHED_MODES)}")
                _check(len(d.get("server", "")) <= 64, f"{key}.devices[{i}].server", "must be at most 64 characters")
        _check(not self.endpoint_socket or os.path.isabs(self.endpoint_socket), f"{key}.endpoint_socket",
               "must be an absolute path (or empty for the default)")
        _check(0 <= self.socket_mode <= 0o777, f"{key}.socket_mode", "must be an octal file mode such as 0660")
        _check(0.0 < self.default_sm_share <= 1.0, f"{key}.default_sm_share", "must be in (0, 1]")
        _check(1 <= self.default_mem_mib <= 1 << 24, f"{key}.default_mem_mib", "must be between 1 and 16777216")


@dataclass
class PlacementConfig:
    """Cluster placement (part 'placement'): this host's id, the hosts plans may move VMs between."""

    host_id: str = ""  # this daemon's host in plans; empty: the hosts entry with our libvirt_uri, else hostname
    hosts: list[dict[str, Any]] = field(default_factory=list)  # [{id, libvirt_uri, daemon, migrate_uri}]
    overcommit: dict[str, float] = field(default_factory=dict)  # per resource (cpu, mem) for live inventories
    migrate_unsafe: bool = False  # VIR_MIGRATE_UNSAFE: disks are shared, but not on a file system libvirt knows
    history_samples: int = 60  # samples per VM fed to the hotspot and idle detectors

    def validate(self, key: str) -> None:
        from symbiont.placement.execute import parse_hosts

        try:
            parse_hosts(self.hosts, f"{key}.hosts")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        _check(isinstance(self.overcommit, dict), f"{key}.overcommit", "must be a mapping resource: ratio")
        for r, v in self.overcommit.items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 100
            _check(ok, f"{key}.overcommit.{r}", f"must be a ratio in (0, 100], got {v!r}")
        _check(1 <= self.history_samples <= 10_000, f"{key}.history_samples", "must be between 1 and 10000")


@dataclass
class PagingConfig:
    """Host paging (part 'paging'): the daemon's zram swap tier, page-out, park and wake."""

    enabled: bool = False  # create the swap tier at start (else page-out/park answer 409)
    zram_size_mib: int = 4096  # the tier's (uncompressed) size; at most half the host's memory
    compressor: str = "lzo-rle"  # zram comp_algorithm (this kernel's list: /sys/block/zram*/comp_algorithm)
    swap_priority: int = 100  # swapon priority: above any other swap, so page-outs land in RAM
    margin_mib: int = 64  # a page-out leaves the guest's working set + this resident
    park_observe_s: float = 3.0  # while parking: how long the paged-out VM runs to show its idle working set
    include_code_cache: bool = True  # park also pages out TCG's translation cache (reported apart)
    prefetch: str = "touch"  # wake's prefetch: touch (fault in and map) or willneed (into the swap cache)

    def validate(self, key: str) -> None:
        from symbiont.host import zram

        _check(self.compressor in zram.compressors(), f"{key}.compressor",
               f"{self.compressor!r} is not offered by this kernel's zram (offered: {', '.join(zram.compressors())})")
        _check(self.zram_size_mib >= 16, f"{key}.zram_size_mib", "must be at least 16 MiB")
        if self.enabled:
            import psutil

            half = psutil.virtual_memory().total // (2 << 20)
            _check(self.zram_size_mib <= half, f"{key}.zram_size_mib",
                   f"{self.zram_size_mib} MiB exceeds half of this host's memory ({half} MiB): zram keeps the "
                   "swapped pages in RAM, and pages that do not compress would take their full size, leaving "
                   "too little for the VMs the tier is meant to make room for")
        _check(-1 <= self.swap_priority <= 32767, f"{key}.swap_priority", "must be between -1 and 32767")
        _check(0 <= self.margin_mib <= 1 << 20, f"{key}.margin_mib", "must be between 0 and 1048576")
        _check(0.0 <= self.park_observe_s <= 60.0, f"{key}.park_observe_s", "must be between 0 and 60 seconds")
        _check(self.prefetch in ("touch", "willneed"), f"{key}.prefetch", "must be touch or willneed")


@dataclass
class Config:
    state_dir: str = "/var/lib/symbiont"
    socket: str = "/run/symbiont/symbiontd.sock"
    socket_mode: int = 0o660
    socket_group: str = ""  # group owning the API socket; empty: the daemon's group
    libvirt_uri: str = "qemu:///system"
    log_level: str = "INFO"
    restore_on_exit: bool = True  # every knob turned is restored on stop / unregister
    control: ControlConfig = field(default_factory=ControlConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    lab: LabConfig = field(default_factory=LabConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    ssdcache: SsdCacheConfig = field(default_factory=SsdCacheConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    paging: PagingConfig = field(default_factory=PagingConfig)

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
        self.memory.validate("memory")
        self.ssdcache.validate("ssdcache")
        self.placement.validate("placement")
        self.gpu.validate("gpu")
        self.paging.validate("paging")

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
    cfg = _build(Config, data, "")
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


def dump_default_config() -> str:
    cfg = Config()
    d = dataclasses.asdict(cfg)
    d["socket_mode"] = f"{cfg.socket_mode:04o}"
    d["gpu"]["socket_mode"] = f"{cfg.gpu.socket_mode:04o}"
    return yaml.safe_dump(d, sort_keys=False)
