"""Standalone scripts that tests/test_distributed.py launches as separate ranks (gloo, loopback only)."""
