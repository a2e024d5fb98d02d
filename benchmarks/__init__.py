"""Benchmarks for flask-silo-sql (run ``python benchmarks/requests.py --help``)."""
