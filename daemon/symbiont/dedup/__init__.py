"""symbiont.dedup: page sharing — KSM control (opt-in policies, save/restore of every tunable) and
a page-hashing engine (CPU, CuPy, simulated GPU) that estimates sharing potential and drives KSM's
scan rate. See docs/dedup.md."""
