"""t2f.trainer: fits the mapper on pairs the generator makes itself (`t2f-train`: synth, fit, bank)."""
