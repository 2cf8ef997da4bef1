"""Simulate: evaluate recommenders with the run's user agents (docs/simulation.md)."""
