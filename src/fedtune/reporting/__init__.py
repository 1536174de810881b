"""Metrics log and progress display."""
