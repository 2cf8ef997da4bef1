"""Test helpers that ship with the package (demo and benchmarks use them too)."""
