"""Experiments: several runs side by side, measured and drawn (`tinylm experiment NAME`)."""
