"""symbiont.memory"""
