"""Constant folding and shape simplification."""
