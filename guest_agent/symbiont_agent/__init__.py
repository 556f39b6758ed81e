"""symbiont guest agent: the guest's side of symbiotic resource management.

Standard library only, so it runs under a stock guest ``/usr/bin/python3``. It answers the
daemon over a virtio-serial port and decides, inside the guest, *what* to give up when the
host decides *how much*.
"""

__version__ = "0.1.0"
