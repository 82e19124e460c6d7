"""Benchmarks behind `cognate bench`: each prints its figures as one JSON line."""
