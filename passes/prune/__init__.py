"""Pruning passes."""
