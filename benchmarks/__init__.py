"""fedtune performance measurements (not tests). Run `python -m benchmarks --help`."""
