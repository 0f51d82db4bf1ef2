"""Benchmarks: commands that print JSON and write results/<name>.json."""
