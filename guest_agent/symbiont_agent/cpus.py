"""Onlining and offlining vCPUs inside the guest (the guest half of vCPU hotplug)."""

from __future__ import annotations

import os

from symbiont_agent.stats import cpu_lists

CPU_ROOT = "/sys/devices/system/cpu"


def _set_online(cpu: int, online: bool, root: str = CPU_ROOT) -> bool:
    path = os.path.join(root, f"cpu{cpu}", "online")
    if not os.path.exists(path):  # cpu0 usually cannot be offlined
        return False
    with open(path, "w") as fh:
        fh.write("1" if online else "0")
    return True


def online_cpus(target: int | None = None, root: str = CPU_ROOT) -> dict:
    """Bring CPUs online (all present ones, or until ``target`` are online).

    With ``target`` below the current count, CPUs are offlined from the highest number down
    (cpu0 is never offlined). Returns what changed and the resulting online list.
    """
    lists = cpu_lists(root)
    present = lists["present"]
    online = set(lists["online"])
    if target is not None and (target < 1 or target > len(present)):
        raise ValueError(f"target {target} outside 1..{len(present)} present CPUs")
    changed_on: list[int] = []
    changed_off: list[int] = []
    want = len(present) if target is None else target
    for cpu in present:
        if len(online) >= want:
            break
        if cpu not in online and _set_online(cpu, True, root):
            online.add(cpu)
            changed_on.append(cpu)
    for cpu in sorted(online, reverse=True):
        if len(online) <= want:
            break
        if cpu != 0 and _set_online(cpu, False, root):
            online.discard(cpu)
            changed_off.append(cpu)
    after = cpu_lists(root)
    return {"onlined": changed_on, "offlined": changed_off, "online": after["online"], "present": after["present"]}
