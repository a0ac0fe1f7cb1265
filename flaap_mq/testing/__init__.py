"""Helpers for tests only: the CLI run as a subprocess, TFF's local runtime to compare with.

No module of the product imports this package (tests/unit/test_layering.py).
"""
