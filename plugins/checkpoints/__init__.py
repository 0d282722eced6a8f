"""Built-in checkpoint formats: whole-VLM checkpoint layouts, one module per family."""
