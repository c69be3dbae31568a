"""Benchmark harness: `python -m bench --help`."""
