"""Training and evaluation data: LLaVA-format records, chat templates, tokenizers, and the generated synthetic task."""
