"""Benchmarks: `make bench` runs them, prints the figures and writes them to bench/results/."""
