"""Helpers shared by the tests: generated data, bundles and fixtures (re-exported by conftest.py)."""
