"""Data: sources, validation, prompt templates, tokenisation, batching and partitioning."""
