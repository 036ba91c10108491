"""Amphista speculative decoding (arXiv 2406.13170) as a vLLM plugin.

Wings: model/ (the draft model), serving/ (inside vLLM), training/, reference/ (a decoder
outside vLLM), kernels/, eval/, convert/. The README has the map."""

__version__ = "0.1.0"
