"""symbiont.gpu"""
