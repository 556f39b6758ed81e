"""symbiont.migration"""
