"""Held-out evaluation of the global adapter."""
