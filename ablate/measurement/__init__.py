"""The measurement wing: one run of one config (`measure.measure`, which is `ablate.measure`), from the machine check to
the typed record (`record.Record`): counting on the meta device, execution modes, stage timing, roofline floors,
profiles, fidelity."""
