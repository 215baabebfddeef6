"""ETRM models: the TRM decoder with ACT, the context encoders, the loss head, TRM checkpoint loading."""

from etrm.models.act import ETRM, Carry, build_model

__all__ = ["ETRM", "Carry", "build_model"]
