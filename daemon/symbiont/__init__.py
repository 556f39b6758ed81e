"""symbiont: symbiotic resource management for virtualized hosts.

The hypervisor side (this package) decides *how much* memory, SSD cache, CPU and GPU each VM
gets; the guest agent (``symbiont_agent``) decides *what* to give up.
"""

__version__ = "0.1.0"
