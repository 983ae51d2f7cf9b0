"""Cleanup passes: dead code, no-ops, CSE."""
