"""Cognate: pretrain small recursive reasoning language models."""

__version__ = "0.1.0"
