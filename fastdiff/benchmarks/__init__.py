"""Benchmark definitions (one module per op), run by benchmarks/bench_<op>.py and `fastdiff bench`."""
