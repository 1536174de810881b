"""Base model loading, LoRA attach/extract/load, forward losses and generation."""
