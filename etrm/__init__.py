"""ETRM: Encoder-based Tiny Recursive Models for few-shot ARC-AGI."""

__version__ = "0.1.0"
