"""Benchmarks behind `hilomoe bench ...`: one module per command."""
