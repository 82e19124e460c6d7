"""Elementwise kernels compiled where the platform allows it, eager elsewhere.

The model's hot elementwise work (a chunk's softmax statistics in the fused LM head, attention's softmax and its
gradient) is a handful of passes over a large tensor in eager PyTorch; `torch.compile` fuses each into one or two.
"""

from __future__ import annotations

import warnings

import torch


class compiled_where_available:  # lower-case: used like a function decorator
    """`torch.compile(fn)`, falling back to eager `fn` (with one warning) where compilation is not possible.

    Compilation needs a C++ compiler on CPU and Triton on GPU; without them the model still works, just slower.
    Shapes start static and turn dynamic after the first recompilation (torch's default), so varying batch and
    sequence sizes cost at most two compilations per kernel.
    """

    def __init__(self, fn) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=None)
        self.usable = True

    def __call__(self, *args):
        if self.usable:
            try:
                return self.compiled(*args)
            except Exception as error:  # any compiler failure means: run eagerly
                self.usable = False
                warnings.warn(f"{self.eager.__name__} runs uncompiled (slower): {error}", stacklevel=2)
        return self.eager(*args)
