"""symbiont.placement"""
