"""symbiont.cpu"""
