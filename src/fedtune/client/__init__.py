"""Local training on one client's data with the shared base model."""
