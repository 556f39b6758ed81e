"""symbiont_research.lab"""
