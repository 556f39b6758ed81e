"""symbiont's placement (host elimination, Sandpiper hotspots, idle VMs) as OpenStack Watcher strategies."""
