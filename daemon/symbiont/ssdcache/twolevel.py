"""DoubleDecker: a two-level (hypervisor / VM) cache with a memory tier in front of the SSD tier.

The hypervisor keeps a second-chance cache of clean pages that guests evict (DoubleDecker
extends cleancache; here the producer calls :meth:`TwoLevelCache.put` / :meth:`get` /
:meth:`invalidate`). Both levels are configured by ``<T, W>`` tuples — a cache type (``mem``
or ``ssd``) and a weight:

* **hypervisor level, across VMs**: each VM's share of a tier is ``capacity_T · W_vm / ΣW``
  over the VMs configured for that tier;
* **VM level, across containers**: the VM's share of each tier is split among its containers
  by *their* ``<T, W>`` — a decision the guest makes (``doubledecker-split`` in the agent; the
  same function runs here when the agent does not answer).

Partitioning is deterministic: a container never holds more of a tier than its quota; when
it is full, its own least recently used object goes (demoted from memory to the SSD when the
container also has an SSD quota). Reconfiguration takes effect at once, without restarting
anything: quotas are recomputed and every partition above its new quota is shrunk. Moving a
container from ``mem`` to ``ssd`` demotes its objects to the SSD tier.

The memory tier holds bytes in host memory; the SSD tier stores 4 KiB pages in 1 MiB blocks of
the shared pool (:class:`~symbiont.ssdcache.pool.Pool`), in slots it allocates itself.

Pure parts (:func:`vm_shares`, :func:`container_quotas`) are separate from the store.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from symbiont.ssdcache.layout import BLOCK_SHIFT, BLOCK_SIZE

TIERS = ("mem", "ssd")
PAGE = 4096
DEFAULT_CONTAINER = "-"  # the VM itself, when it names no containers


class TwoLevelError(ValueError):
    """A configuration that cannot be applied (the message names what is wrong)."""


def parse_tw(spec: Any) -> dict[str, int]:
    """``<T, W>`` in any of the accepted spellings → ``{tier: weight}``.

    ``{"type": "mem", "weight": 60}``, ``["ssd", 100]``, ``{"mem": 50, "ssd": 10}`` (both tiers).
    """
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        spec = {"type": spec[0], "weight": spec[1]}
    if not isinstance(spec, Mapping):
        raise TwoLevelError(f"<T, W> must be {{type, weight}} or [type, weight], got {spec!r}")
    if "type" in spec:
        t = str(spec["type"]).lower()
        w = spec.get("weight")
        if t not in TIERS:
            raise TwoLevelError(f"cache type must be mem or ssd, got {spec['type']!r}")
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 1_000_000:
            raise TwoLevelError(f"weight must be an integer 0..1000000, got {w!r}")
        return {t: w}
    out = {}
    for t, w in spec.items():
        if t not in TIERS:
            raise TwoLevelError(f"cache type must be mem or ssd, got {t!r}")
        if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w <= 1_000_000:
            raise TwoLevelError(f"weight must be an integer 0..1000000, got {w!r}")
        out[t] = w
    return out


def _split(total: int, weights: Mapping[str, int]) -> dict[str, int]:
    """Integer split of ``total`` by weight (largest remainder); zero weights get zero."""
    members = {k: w for k, w in weights.items() if w > 0}
    out = {k: 0 for k in weights}
    wsum = sum(members.values())
    if not wsum or total <= 0:
        return out
    exact = {k: total * w / wsum for k, w in members.items()}
    for k, v in exact.items():
        out[k] = int(v)
    left = total - sum(out.values())
    for k in sorted(members, key=lambda k: (-(exact[k] - int(exact[k])), k))[:left]:
        out[k] += 1
    return out


def vm_shares(capacity: Mapping[str, int], vms: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Hypervisor level: each VM's share (objects) of each tier by its ``<T, W>``."""
    out: dict[str, dict[str, int]] = {vm: {t: 0 for t in TIERS} for vm in vms}
    for t in TIERS:
        for vm, q in _split(int(capacity.get(t, 0)), {vm: tw.get(t, 0) for vm, tw in vms.items()}).items():
            out[vm][t] = q
    return out


def container_quotas(share: Mapping[str, int], containers: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """VM level: split a VM's share of each tier among its containers by their ``<T, W>``."""
    if not containers:
        return {DEFAULT_CONTAINER: {t: int(share.get(t, 0)) for t in TIERS}}
    out: dict[str, dict[str, int]] = {c: {t: 0 for t in TIERS} for c in containers}
    for t in TIERS:
        for c, q in _split(int(share.get(t, 0)), {c: tw.get(t, 0) for c, tw in containers.items()}).items():
            out[c][t] = q
    return out


@dataclass
class Partition:
    """One container's objects in each tier, in LRU order, with its quotas."""

    quota: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TIERS})
    mem: OrderedDict[Hashable, bytes] = field(default_factory=OrderedDict)
    ssd: OrderedDict[Hashable, int] = field(default_factory=OrderedDict)  # key -> slot
    puts: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    demotions: int = 0

    def used(self) -> dict[str, int]:
        return {"mem": len(self.mem), "ssd": len(self.ssd)}


class SsdTier:
    """4 KiB slots in a range of pool blocks (all I/O through the pool's descriptors)."""

    def __init__(self, pool: Any, pbns: list[int]) -> None:
        self.pool = pool
        self.pbns = list(pbns)
        self.slots_per_block = BLOCK_SIZE // PAGE
        self.capacity = len(self.pbns) * self.slots_per_block
        self.free = list(range(self.capacity - 1, -1, -1))

    def _phys(self, slot: int) -> int:
        blk, i = divmod(slot, self.slots_per_block)
        return (self.pbns[blk] << BLOCK_SHIFT) + i * PAGE

    def alloc(self) -> int | None:
        return self.free.pop() if self.free else None

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def write(self, slot: int, data: bytes) -> None:
        self.pool.pwrite(self._phys(slot), data.ljust(PAGE, b"\0"))

    def read(self, slot: int) -> bytes:
        return self.pool.pread(self._phys(slot), PAGE)


class TwoLevelCache:
    """The hypervisor cache: ``<T, W>`` partitions across VMs and, inside each, containers."""

    def __init__(self, mem_pages: int, ssd: SsdTier | None = None,
                 split: Callable[[str, dict[str, int], dict[str, dict[str, int]]], dict[str, dict[str, int]]] | None = None,
                 exclusive: bool = True) -> None:
        self.capacity = {"mem": int(mem_pages), "ssd": ssd.capacity if ssd is not None else 0}
        self.ssd = ssd
        self.exclusive = exclusive  # DoubleDecker's exclusive caching: a hit moves the page back up
        self.vms: dict[str, dict[str, int]] = {}
        self.containers: dict[str, dict[str, dict[str, int]]] = {}
        self.parts: dict[tuple[str, str], Partition] = {}
        self.split = split  # VM-level split (the guest's decision); default: container_quotas
        self.lock = threading.RLock()
        self.reconfigurations = 0
        self.history: list[dict[str, Any]] = []

    # -- configuration --------------------------------------------------------------------
    def configure_vm(self, vm: str, tw: Any, containers: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Set a VM's ``<T, W>`` (and optionally its containers'); takes effect at once."""
        with self.lock:
            self.vms[vm] = parse_tw(tw)
            if containers is not None:
                self.containers[vm] = {c: parse_tw(s) for c, s in containers.items()}
            else:
                self.containers.setdefault(vm, {})
            return self._repartition(f"configure {vm}")

    def configure_container(self, vm: str, container: str, tw: Any) -> dict[str, Any]:
        with self.lock:
            if vm not in self.vms:
                raise TwoLevelError(f"VM {vm!r} has no <T, W> yet")
            self.containers.setdefault(vm, {})[container] = parse_tw(tw)
            return self._repartition(f"configure {vm}/{container}")

    def remove(self, vm: str, container: str | None = None) -> dict[str, Any]:
        with self.lock:
            if container is None:
                self.vms.pop(vm, None)
                self.containers.pop(vm, None)
            else:
                self.containers.get(vm, {}).pop(container, None)
            return self._repartition(f"remove {vm}/{container or '*'}")

    def refresh(self, why: str) -> dict[str, Any]:
        """Recompute quotas (e.g. after the guests' VM-level split changed)."""
        with self.lock:
            return self._repartition(why)

    def quotas(self) -> dict[tuple[str, str], dict[str, int]]:
        shares = vm_shares(self.capacity, self.vms)
        out: dict[tuple[str, str], dict[str, int]] = {}
        for vm, share in shares.items():
            cont = self.containers.get(vm, {})
            split = self.split(vm, share, cont) if self.split is not None and cont else container_quotas(share, cont)
            for c, q in split.items():
                out[(vm, c)] = {t: int(q.get(t, 0)) for t in TIERS}
        return out

    def _repartition(self, why: str) -> dict[str, Any]:
        q = self.quotas()
        for key in list(self.parts):
            if key not in q:  # a container or VM that left: its objects go
                p = self.parts.pop(key)
                for slot in p.ssd.values():
                    self._ssd_release(slot)
        for key, quota in q.items():
            p = self.parts.setdefault(key, Partition())
            p.quota = quota
            self._shrink(p)
        self.reconfigurations += 1
        self.history.append({"ts": time.time(), "why": why, "quotas": {f"{v}/{c}": qq for (v, c), qq in q.items()}})
        del self.history[:-100]
        return {"why": why, "quotas": {f"{v}/{c}": qq for (v, c), qq in q.items()}}

    def _shrink(self, p: Partition) -> None:
        while len(p.mem) > p.quota["mem"]:
            key, data = p.mem.popitem(last=False)
            self._demote(p, key, data)
        while len(p.ssd) > p.quota["ssd"]:
            _key, slot = p.ssd.popitem(last=False)
            self._ssd_release(slot)
            p.evictions += 1

    def _demote(self, p: Partition, key: Hashable, data: bytes) -> None:
        if p.quota["ssd"] > 0 and self.ssd is not None:
            self._ssd_put(p, key, data)
            p.demotions += 1
        else:
            p.evictions += 1

    def _ssd_release(self, slot: int) -> None:
        if self.ssd is not None:
            self.ssd.release(slot)

    def _ssd_put(self, p: Partition, key: Hashable, data: bytes) -> bool:
        assert self.ssd is not None
        if key in p.ssd:
            p.ssd.move_to_end(key)
            self.ssd.write(p.ssd[key], data)
            return True
        while len(p.ssd) >= p.quota["ssd"] and p.ssd:
            _k, slot = p.ssd.popitem(last=False)
            self._ssd_release(slot)
            p.evictions += 1
        if p.quota["ssd"] <= 0:
            return False
        slot = self.ssd.alloc()
        if slot is None:
            return False
        self.ssd.write(slot, data)
        p.ssd[key] = slot
        return True

    # -- data path (cleancache-like) ------------------------------------------------------
    def _part(self, vm: str, container: str | None) -> Partition:
        key = (vm, container or DEFAULT_CONTAINER)
        p = self.parts.get(key)
        if p is None:
            raise TwoLevelError(f"no partition for {vm}/{container or DEFAULT_CONTAINER}")
        return p

    def put(self, vm: str, container: str | None, key: Hashable, data: bytes) -> str | None:
        """Store a clean page; returns the tier it went to (None: this container has no quota)."""
        if len(data) > PAGE:
            raise TwoLevelError("objects are pages of at most 4 KiB")
        with self.lock:
            p = self._part(vm, container)
            p.puts += 1
            if key in p.ssd and p.quota["mem"] > 0:
                self._ssd_release(p.ssd.pop(key))
            if p.quota["mem"] > 0:
                p.mem[key] = bytes(data)
                p.mem.move_to_end(key)
                while len(p.mem) > p.quota["mem"]:
                    k, d = p.mem.popitem(last=False)
                    self._demote(p, k, d)
                return "mem"
            if p.quota["ssd"] > 0 and self.ssd is not None and self._ssd_put(p, key, data):
                return "ssd"
            return None

    def get(self, vm: str, container: str | None, key: Hashable) -> bytes | None:
        with self.lock:
            p = self._part(vm, container)
            if key in p.mem:
                p.hits += 1
                return p.mem.pop(key) if self.exclusive else p.mem[key]
            if key in p.ssd:
                p.hits += 1
                slot = p.ssd[key]
                data = self.ssd.read(slot) if self.ssd is not None else b""
                if self.exclusive:
                    del p.ssd[key]
                    self._ssd_release(slot)
                return data
            p.misses += 1
            return None

    def invalidate(self, vm: str, container: str | None, key: Hashable) -> None:
        with self.lock:
            p = self._part(vm, container)
            p.mem.pop(key, None)
            slot = p.ssd.pop(key, None)
            if slot is not None:
                self._ssd_release(slot)

    # -- views ----------------------------------------------------------------------------
    def occupancy(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {f"{vm}/{c}": {"quota": dict(p.quota), "used": p.used(), "puts": p.puts, "hits": p.hits,
                                  "misses": p.misses, "evictions": p.evictions, "demotions": p.demotions}
                    for (vm, c), p in sorted(self.parts.items())}

    def view(self) -> dict[str, Any]:
        with self.lock:
            return {
                "capacity_pages": dict(self.capacity),
                "vms": {vm: dict(tw) for vm, tw in self.vms.items()},
                "containers": {vm: {c: dict(tw) for c, tw in cs.items()} for vm, cs in self.containers.items()},
                "partitions": self.occupancy(),
                "reconfigurations": self.reconfigurations,
            }
