"""The model wing: the VLM (four components, one method per stage), building it from a config, loading its weights,
and the plain-downsampling baseline (the encoder at the size that gives N tokens)."""
