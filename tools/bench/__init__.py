"""Benchmarks: each compares the product with a baseline in one run and prints a table."""
