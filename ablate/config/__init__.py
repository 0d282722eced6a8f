"""The config wing: composing a config from presets, files and overrides; run and training options; presets;
checkpoint folders described as configs. Nothing here builds a model or looks at the machine."""
