"""Context modules: turn a batch's demos (or its puzzle id) into the decoder's prefix context.

Every context module returns an `EncoderOutput`: the prefix slots, with `arch.cell_lookup` one
vector per cell of the decoder's canvas (`CellLookup`'s), and the KL of variational encoders.
Demo encoders read `demo_inputs`, `demo_outputs` [B, D, 900] and `demo_mask` [B, D]. They share
one per-demo grid transformer (`encoder_parts.DemoGridEncoder`) and differ in how the demos are
combined:

- standard: summary token per demo → mean over demos → projection.
- hybrid_standard: all demos' cell states → `context_len` learned queries (cross-attention).
- hybrid_variational: hybrid_standard's queries pooled → Gaussian latent → projection.
- lpn_var: Gaussian latent per demo → mean of the latents → projection.

The variational ones sample their latent in training only when `samples_latent(arch)`: with
`kl_weight` 0 they use μ (deterministic), unless `arch.variational_sample` says otherwise.

A sample without any demo gets a zero context and zero KL.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import nn

from etrm.config import ENCODER_TYPES, ArchConfig
from etrm.errors import EtrmError
from etrm.models.encoder_parts import (
    CellLookup,
    ContextProjection,
    CrossAttentionPool,
    DemoGridEncoder,
    GaussianLatent,
    context_linear,
    mean_over_present,
    pack_present,
)


@dataclass
class EncoderOutput:
    """What a context module hands the decoder."""

    slots: torch.Tensor  # [B, n ≤ puzzle_emb_len, hidden]: the prefix (the decoder zero-pads the rest)
    cells: torch.Tensor | None = None  # [B, seq_len, hidden]: added to each query cell's token embedding
    kl: torch.Tensor | None = None  # [B]: KL of a variational encoder's posterior, per sample

    def with_rows(self, rows: torch.Tensor, fresh: EncoderOutput) -> EncoderOutput:
        """This (cached) output with `rows` replaced by `fresh`, the encoder's output for those rows;
        the KL is fresh's on those rows and 0 elsewhere (a cached row adds none)."""

        def put(cached, new):
            return None if cached is None else cached.index_put((rows,), new.to(cached.dtype))

        kl = (
            None if fresh.kl is None else fresh.kl.new_zeros(self.slots.shape[0]).index_put((rows,), fresh.kl)
        )
        return EncoderOutput(put(self.slots, fresh.slots), put(self.cells, fresh.cells), kl)


class DemoEncoder(nn.Module, abc.ABC):
    """Base of the demo encoders: encodes each present demo once, then `combine` builds the context."""

    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.width = arch.encoder_hidden_size or arch.hidden_size
        self.num_heads = arch.encoder_num_heads or arch.num_heads
        self.latent_dim = arch.encoder_latent_dim or self.width
        self.grid_encoder = DemoGridEncoder(
            arch.vocab_size,
            self.width,
            self.num_heads,
            arch.expansion,
            arch.encoder_num_layers,
            arch.rms_norm_eps,
            grid_coords=arch.grid_coords,
        )
        side = math.isqrt(arch.seq_len)  # the decoder's canvas, whose cells the per-cell parts answer
        self.cell_lookup = (
            CellLookup(arch.vocab_size, self.width, self.num_heads, arch.hidden_size, side, arch.grid_coords)
            if arch.cell_lookup
            else None
        )

    def forward(self, batch: dict) -> EncoderOutput:
        present = batch["demo_mask"].bool()
        has_demos = present.any(dim=1)
        if not has_demos.any():
            # Encode one empty slot anyway (its result is zeroed below) so no tensor has a zero batch size.
            present = torch.zeros_like(present)
            present[0, 0] = True
        inputs, outputs = batch["demo_inputs"][present], batch["demo_outputs"][present]
        demos = self.grid_encoder(inputs, outputs)
        slots, kl = self.combine(demos.states, demos.attend, present)
        cells = None
        if self.cell_lookup is not None:
            packed = pack_present(present, demos.states, demos.attend, demos.colours, demos.partners)
            cells = self.cell_lookup(batch["inputs"], *packed)

        def zero_without_demos(value):
            if value is None:
                return None
            return torch.where(has_demos.view(-1, *[1] * (value.dim() - 1)), value, torch.zeros_like(value))

        return EncoderOutput(zero_without_demos(slots), zero_without_demos(cells), zero_without_demos(kl))

    @abc.abstractmethod
    def combine(self, states, attend, present) -> tuple[torch.Tensor, torch.Tensor | None]:
        """states [N, S, width], attend [N, S] of the N present demos; present [B, D] → (context, kl)."""


class StandardEncoder(DemoEncoder):
    def __init__(self, arch: ArchConfig):
        super().__init__(arch)
        self.to_context = ContextProjection(self.width, arch.context_len, arch.hidden_size)

    def combine(self, states, attend, present):
        return self.to_context(mean_over_present(states[:, 0], present)), None


class HybridEncoder(DemoEncoder):
    """hybrid_standard; with `variational` the queries are mean-pooled into a Gaussian latent (hybrid_variational)."""

    def __init__(self, arch: ArchConfig, variational: bool):
        super().__init__(arch)
        self.set_pool = CrossAttentionPool(
            self.width, self.num_heads, arch.expansion, arch.context_len, arch.rms_norm_eps
        )
        if variational:
            self.latent = GaussianLatent(self.width, self.latent_dim, samples_latent(arch))
            self.to_context = ContextProjection(self.latent_dim, arch.context_len, arch.hidden_size)
        else:
            self.latent = None
            self.to_context = context_linear(self.width, arch.hidden_size, arch.hidden_size)

    def combine(self, states, attend, present):
        queries = self.set_pool(*pack_present(present, states, attend))
        if self.latent is None:
            return self.to_context(queries), None
        z, kl = self.latent(queries.mean(dim=1))
        return self.to_context(z), kl


class LpnVariationalEncoder(DemoEncoder):
    def __init__(self, arch: ArchConfig):
        super().__init__(arch)
        self.latent = GaussianLatent(self.width, self.latent_dim, samples_latent(arch))
        self.to_context = ContextProjection(self.latent_dim, arch.context_len, arch.hidden_size)

    def combine(self, states, attend, present):
        z, kl = self.latent(states[:, 0])
        return self.to_context(mean_over_present(z, present)), mean_over_present(kl, present)


def samples_latent(arch: ArchConfig) -> bool:
    """Whether a variational encoder samples z in training: auto = only when the KL is weighted."""
    if arch.variational_sample == "auto":
        return arch.kl_weight > 0
    return arch.variational_sample == "always"


def build_encoder(arch: ArchConfig) -> nn.Module:
    """The context module `arch.encoder_type` names: `forward(batch) -> EncoderOutput`."""
    if arch.encoder_type == "puzzle_embedding":
        from etrm.models.puzzle_embedding import PuzzleEmbeddingContext

        return PuzzleEmbeddingContext(arch)
    if arch.encoder_type == "standard":
        return StandardEncoder(arch)
    if arch.encoder_type in ("hybrid_standard", "hybrid_variational"):
        return HybridEncoder(arch, variational=arch.encoder_type == "hybrid_variational")
    if arch.encoder_type == "lpn_var":
        return LpnVariationalEncoder(arch)
    raise EtrmError(f"arch.encoder_type={arch.encoder_type!r} is not one of {', '.join(ENCODER_TYPES)}")
