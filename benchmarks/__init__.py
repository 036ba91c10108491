"""Benchmark scripts: each writes JSON and prints a table."""
