"""Engines that drive rounds: the in-process simulation (and, later, Flower)."""
