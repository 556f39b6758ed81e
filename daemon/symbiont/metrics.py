"""Prometheus metrics of the daemon (on prometheus-client's default registry).

Defined once at import, so parts and tests that build several daemons in one process share
them; the daemon clears per-VM series when a VM is unregistered.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

VM_LABEL = ("vm",)

host_cpu_percent = Gauge("symbiont_host_cpu_percent", "Host CPU utilisation over the last period")
host_mem_available_bytes = Gauge("symbiont_host_mem_available_bytes", "Host MemAvailable")
host_mem_total_bytes = Gauge("symbiont_host_mem_total_bytes", "Host MemTotal")
host_psi_some_avg10 = Gauge("symbiont_host_psi_some_avg10", "Host PSI some avg10", ("resource",))

vms_registered = Gauge("symbiont_vms_registered", "VMs registered with the daemon")
vm_cooperative = Gauge("symbiont_vm_cooperative", "1 when the VM's agent answers", VM_LABEL)
vm_balloon_actual_bytes = Gauge("symbiont_vm_balloon_actual_bytes", "Balloon 'actual' (libvirt)", VM_LABEL)
vm_guest_mem_total_bytes = Gauge("symbiont_vm_guest_mem_total_bytes", "Guest MemTotal (agent)", VM_LABEL)
vm_guest_mem_available_bytes = Gauge(
    "symbiont_vm_guest_mem_available_bytes", "Guest MemAvailable (agent)", VM_LABEL
)
vm_vcpus = Gauge("symbiont_vm_vcpus", "Live vCPUs (libvirt)", VM_LABEL)
vm_guest_online_cpus = Gauge("symbiont_vm_guest_online_cpus", "CPUs online inside the guest", VM_LABEL)
vm_guest_psi_mem_some_avg10 = Gauge("symbiont_vm_guest_psi_memory_some_avg10", "Guest memory PSI", VM_LABEL)
vm_qemu_cpu_percent = Gauge("symbiont_vm_qemu_cpu_percent", "QEMU process CPU %", VM_LABEL)

agent_protocol_errors = Counter("symbiont_agent_protocol_errors_total", "Dropped agent connections", VM_LABEL)
agent_handshakes = Counter("symbiont_agent_handshakes_total", "Agent handshakes", VM_LABEL)
agent_events = Counter("symbiont_agent_events_total", "Events sent by the VM's agent", VM_LABEL)
control_loop_seconds = Histogram(
    "symbiont_control_loop_seconds",
    "Wall time of one control-loop iteration",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
control_loop_cpu_seconds = Counter("symbiont_control_loop_cpu_seconds_total", "Daemon CPU spent in the loop")
actions_total = Counter("symbiont_actions_total", "Knob changes by the daemon", ("part", "action"))

PER_VM = (
    vm_cooperative,
    vm_balloon_actual_bytes,
    vm_guest_mem_total_bytes,
    vm_guest_mem_available_bytes,
    vm_vcpus,
    vm_guest_online_cpus,
    vm_guest_psi_mem_some_avg10,
    vm_qemu_cpu_percent,
    agent_events,
)


def forget_vm(vm: str) -> None:
    for g in PER_VM:
        try:
            g.remove(vm)
        except KeyError:
            pass
