"""Optimizers: Muon, Grokfast gradient filters, and their combination MuGrokfast."""
