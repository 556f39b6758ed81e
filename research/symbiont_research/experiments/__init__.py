"""Experiments: scenarios that reproduce the seeds' results, each writing CSV + PNG + run.json."""
