"""Benchmarks: accuracy baselines, training cost, serving overhead (see each script's --help)."""
