"""symbiont.dedup"""
