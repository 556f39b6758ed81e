"""symbiont.host"""
