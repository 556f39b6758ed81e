"""symbiont.ssdcache"""
