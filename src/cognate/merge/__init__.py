"""Merging seed models (EvoMerge)."""
