"""The Triton implementations that `etrm.kernels.dispatch` selects (imported only when used)."""

from etrm.kernels.cross_attention_triton import cross_attention
from etrm.kernels.rms_norm_triton import add_rms_norm
from etrm.kernels.rotary_triton import apply_rotary
from etrm.kernels.swiglu_triton import swiglu

__all__ = ["add_rms_norm", "apply_rotary", "cross_attention", "swiglu"]
