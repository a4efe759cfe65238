"""Benchmarks: `make bench` (quick sizes) or `python -m bench --full`; see BENCHMARKS.md."""
