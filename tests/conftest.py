import os

# Tests run on CPU with the torch reference kernels unless a test opts into Triton's interpreter.
os.environ.setdefault("ETRM_KERNELS", "torch")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from etrm.config import ArchConfig  # noqa: E402

# Without a GPU, Triton kernels can only run in Triton's CPU interpreter, and the choice must be made
# before anything imports Triton (torch.compile's Dynamo does). Tests still use the torch path unless
# they set ETRM_KERNELS=triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(2)


def _tiny_arch(encoder_type: str = "standard", **overrides) -> ArchConfig:
    """A model that builds and runs in milliseconds on a CPU; tests override what they vary."""
    fields = dict(
        hidden_size=32,
        num_heads=4,
        expansion=2.0,
        L_layers=1,
        H_cycles=2,
        L_cycles=1,
        halt_max_steps=3,
        puzzle_emb_len=8,
        encoder_type=encoder_type,
        encoder_num_layers=2,
        encoder_hidden_size=24,
        encoder_num_heads=2,
        encoder_latent_dim=8,
        context_len=4,
    )
    fields.update(overrides)
    return ArchConfig(**fields)


@pytest.fixture
def tiny_arch():
    """`tiny_arch(encoder_type="standard", **overrides) -> ArchConfig`: the one small test model."""
    return _tiny_arch
