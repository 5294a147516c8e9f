"""Beam pieces of fullgrad."""
