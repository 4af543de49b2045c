"""The vitops microbenchmark suite: `python -m benchmarks` (or `make bench`)."""
