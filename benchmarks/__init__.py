"""Benchmarks (run as scripts: python benchmarks/bench_*.py); a package so they can share helpers."""
