"""Benchmarks: `python -m bench` prints figures."""
