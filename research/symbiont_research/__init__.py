"""symbiont's research scaffolding: the VM lab (golden image, lab VMs, sessions, peer links,
console), the experiment framework and each part's experiments.

A package of its own, beside the daemon's ``symbiont``, so that a daemon install carries no
research code (no matplotlib-driven scenarios). The ``symbiont`` CLI finds it through
:func:`symbiont.plugins.research` and adds its ``image``, ``lab`` and ``experiment`` groups.
"""
