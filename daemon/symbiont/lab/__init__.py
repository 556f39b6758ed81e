"""symbiont.lab"""
