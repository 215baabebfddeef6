"""Parts shared by the demo encoders: a per-demo grid transformer, a cross-attention set pool,
the per-cell lookup, a Gaussian latent and the projection to context tokens.

Demos arrive as TRM tokens on 30×30 canvases (PAD 0 outside the grid). Only present demos are
encoded, and only their non-PAD cells, padded to the longest demo of the batch and masked out of
attention: the result for a demo does not depend on what else is in the batch, and small
puzzles cost a fraction of the full 2×900 tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from etrm import kernels
from etrm.data.encoding import CANVAS, COLOR_OFFSET, PAD_TOKEN, SEQ_LEN, canvas_corner
from etrm.models.grid_coords import GridCoordinateEmbedding, grid_coordinates
from etrm.models.layers import CastedEmbedding, CastedLinear, PostNormBlock, SwiGLU, trunc_normal_init_

LENGTH_GROUPS = 8  # demos of a batch are encoded in this many groups of similar length
LOGVAR_LIMIT = 10.0  # keeps exp(log σ²) finite in any dtype; far outside any useful posterior


class CellEmbedding(nn.Module):
    """A grid cell as colour + row + column + side (0 input, 1 output) embeddings; with `grid_coords`, also
    + rows below and columns right of it in its own grid (`grid_coordinates`' last two columns)."""

    def __init__(self, vocab_size: int, width: int, grid_coords: bool):
        super().__init__()
        std = 1.0 / math.sqrt(width)
        self.token_embedding = CastedEmbedding(vocab_size, width, std)
        self.row_embedding = CastedEmbedding(CANVAS, width, std)
        self.col_embedding = CastedEmbedding(CANVAS, width, std)
        self.side_embedding = CastedEmbedding(2, width, std)
        self.far_side_embedding = GridCoordinateEmbedding(width, std, which=(2, 3)) if grid_coords else None

    def forward(self, cells, rows, cols, side, coords=None) -> torch.Tensor:
        """Tokens, rows, columns, sides (broadcastable) [+ `grid_coordinates` coords [..., 4]] → [..., width]."""
        embedded = (
            self.token_embedding(cells)
            + self.row_embedding(rows)
            + self.col_embedding(cols)
            + self.side_embedding(side)
        )
        if self.far_side_embedding is not None:
            embedded = embedded + self.far_side_embedding(coords)
        return embedded


@dataclass
class EncodedDemos:
    """`DemoGridEncoder`'s result for N demos, S = 1 summary + the longest demo's cells."""

    states: torch.Tensor  # [N, S, width]; position 0 is the summary
    attend: torch.Tensor  # [N, S] bool: the summary and each demo's own cells
    colours: torch.Tensor  # [N, S] each state's own token (PAD for the summary and the padding)
    partners: torch.Tensor  # [N, S] the token at the same canvas position of the demo's other grid


class DemoGridEncoder(nn.Module):
    """One demo (input grid, output grid) → a summary state plus one state per non-PAD cell.

    Each demo's non-PAD cells (colours and EOS of both grids) are gathered to the front of its
    sequence, which is cut at the longest demo of the batch; the tail is masked. A cell is
    embedded as colour token + row + column + side (input/output), so its position survives
    the gathering (`CellEmbedding`). A learned summary token leads every sequence and is always
    attendable, so no attention row is ever fully masked.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        num_heads: int,
        expansion: float,
        num_layers: int,
        eps: float,
        grid_coords: bool = False,
    ):
        super().__init__()
        self.embed_scale = math.sqrt(width)
        self.cell_embedding = CellEmbedding(vocab_size, width, grid_coords)
        self.summary_token = nn.Parameter(trunc_normal_init_(torch.empty(width), 1.0 / self.embed_scale))
        self.layers = nn.ModuleList(
            PostNormBlock(width, num_heads, expansion, eps) for _ in range(num_layers)
        )
        self.length_groups = LENGTH_GROUPS

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor) -> EncodedDemos:
        """inputs, outputs [N, 900] tokens → each demo's states, with the tokens `CellLookup` matches on."""
        tokens = torch.cat((inputs, outputs), dim=1)
        is_cell = tokens != PAD_TOKEN
        order, group_lengths = self._length_groups(is_cell.sum(dim=1))
        longest = max(group_lengths[-1] - 1, 1)  # the last group holds the longest demo
        # A demo's cells first (stable: in canvas order, reproducibly); `where` holds their canvas positions.
        where = torch.argsort((~is_cell).to(torch.uint8), dim=1, stable=True)[:, :longest]
        cells = tokens.gather(1, where)
        side, offset = where // SEQ_LEN, where % SEQ_LEN
        coords = None
        if self.cell_embedding.far_side_embedding is not None:
            coords = torch.cat((grid_coordinates(inputs, CANVAS), grid_coordinates(outputs, CANVAS)), dim=1)
            coords = coords.gather(1, where[..., None].expand(-1, -1, 4))
        embedded = self.cell_embedding(cells, offset // CANVAS, offset % CANVAS, side, coords)
        summary = self.summary_token.expand(tokens.shape[0], 1, -1)
        h = torch.cat((summary, embedded), dim=1) * self.embed_scale
        attend = F.pad(is_cell.gather(1, where), (1, 0), value=True)
        if order is None:
            for layer in self.layers:
                h = layer(h, attn_mask=attend[:, None, None, :])
        else:
            h = self._encode_by_length(h, attend, order, group_lengths)
        partners = tokens.gather(1, (1 - side) * SEQ_LEN + offset)
        return EncodedDemos(
            h, attend, F.pad(cells, (1, 0), value=PAD_TOKEN), F.pad(partners, (1, 0), value=PAD_TOKEN)
        )

    def _length_groups(self, cells: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
        """(demos sorted by cell count, or None for one group; each group's sequence length incl. summary).

        The one host sync of the encoder: every group's length comes back in a single transfer.
        """
        groups = min(self.length_groups, cells.shape[0])
        if groups <= 1:
            return None, [int(cells.max().item()) + 1]
        order = torch.argsort(cells, stable=True)
        sizes = [len(chunk) for chunk in order.chunk(groups)]
        last_of_group = torch.tensor(sizes, device=cells.device).cumsum(0) - 1
        return order, (cells[order][last_of_group] + 1).tolist()

    def _encode_by_length(
        self, h: torch.Tensor, attend: torch.Tensor, order: torch.Tensor, group_lengths: list[int]
    ) -> torch.Tensor:
        """Run the layers on demos grouped by length, each group cut at its own longest demo.

        Attention never reads a masked position, so a demo's states do not depend on how far its
        sequence is padded: grouping changes the cost (ARC demos run from a few cells to 1,800;
        one 30×30 pair would otherwise pad every demo of the batch to 1,801 tokens), not the result.
        Positions past a demo's cells come back as zeros.
        """
        encoded = []
        for chunk, length in zip(order.chunk(len(group_lengths)), group_lengths, strict=True):
            hg, mask = h[chunk, :length], attend[chunk, :length]
            for layer in self.layers:
                hg = layer(hg, attn_mask=mask[:, None, None, :])
            encoded.append(F.pad(hg, (0, 0, 0, h.shape[1] - length)))
        return torch.cat(encoded)[torch.argsort(order)]


class CrossAttentionPool(nn.Module):
    """`num_queries` learned queries attend over a sample's tokens (masked), then a SwiGLU; post-norm.

    The keys carry no demo index, so the result is invariant to demo order and to empty slots.
    A sample with no attendable token gets a zero attention output.
    """

    def __init__(self, width: int, num_heads: int, expansion: float, num_queries: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.queries = nn.Parameter(trunc_normal_init_(torch.empty(num_queries, width), 1.0))
        self.q_proj = CastedLinear(width, width)
        self.kv_proj = CastedLinear(width, 2 * width)
        self.o_proj = CastedLinear(width, width)
        self.mlp = SwiGLU(width, expansion)

    def forward(self, tokens: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, width], attend [B, L] bool → [B, num_queries, width]."""
        b, length, width = tokens.shape
        head_dim = width // self.num_heads
        queries = self.queries.to(tokens.dtype).expand(b, -1, -1)
        q = self.q_proj(queries).view(b, -1, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv_proj(tokens).view(b, length, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attended = kernels.cross_attention(q, k, v, attend).transpose(1, 2).reshape(b, -1, width)
        h = kernels.add_rms_norm(self.o_proj(attended), queries, self.eps)
        return kernels.add_rms_norm(self.mlp(h), h, self.eps)


class CellLookup(nn.Module):
    """Each cell of the query grid attends over every demo cell state of its sample (`arch.cell_lookup`).

    The query cells are embedded as demo input cells are (colour, row, column and side, by a
    `CellEmbedding` of the lookup's own), so "the demo cells where the input had my colour" or
    "my position in the demos" are matches attention can make in one step; the encoder's layers
    have already put each output cell's colour next to its input's. The result, one vector per query cell at the
    decoder's width, is added to the decoder's token embeddings: a colour table read off the
    demos, for instance, reaches every cell directly instead of through the pooled context.

    Colour identity is also given to the scores directly: per head, a learned weight times
    [query cell's colour = demo cell's colour] and another times [query cell's colour = the
    colour at the same position of the demo's other grid]. Without them the models settled on
    "background stays, every other cell becomes the demos' most common new colour"; a head with
    the second weight high reads the output cells whose input had my colour. The weights are
    stored divided by MATCH_SCALE (Adam moves a parameter by about lr per step, and a useful
    bias is several units), and half the heads start at a partner weight of 4: the other half
    start unbiased. The scores then carry a bias, so this attention runs through SDPA, not the
    fused kernel.
    """

    MATCH_SCALE = 10.0

    def __init__(
        self, vocab_size: int, width: int, num_heads: int, hidden_size: int, side: int, grid_coords: bool
    ):
        super().__init__()
        self.num_heads, self.side = num_heads, side
        self.embed_scale = math.sqrt(width)
        self.cell_embedding = CellEmbedding(vocab_size, width, grid_coords)
        self.q_proj = CastedLinear(width, width)
        self.kv_proj = CastedLinear(width, 2 * width)
        self.out = context_linear(width, hidden_size, hidden_size)
        # [own colour, partner's colour] × heads, in units of 1/MATCH_SCALE.
        self.colour_match = nn.Parameter(torch.zeros(2, num_heads))
        with torch.no_grad():
            self.colour_match[1, : max(1, num_heads // 2)] = 4.0 / self.MATCH_SCALE

    def forward(
        self,
        query: torch.Tensor,
        demo_states: torch.Tensor,
        demo_attend: torch.Tensor,
        demo_colours: torch.Tensor,
        demo_partners: torch.Tensor,
    ) -> torch.Tensor:
        """query [B, 900] tokens; demo_states [B, L, width], demo_attend [B, L], demo_colours and
        demo_partners [B, L] tokens (`EncodedDemos` packed per sample) → [B, side², hidden]."""
        b, side, length, width = query.shape[0], self.side, demo_states.shape[1], demo_states.shape[2]
        cells = canvas_corner(query, side)
        rows = torch.arange(side, device=query.device).repeat_interleave(side)
        cols = torch.arange(side, device=query.device).repeat(side)
        coords = grid_coordinates(cells, side) if self.cell_embedding.far_side_embedding is not None else None
        # Embedded as demo input cells are (side 0).
        embedded = self.cell_embedding(cells, rows, cols, torch.zeros_like(rows), coords)
        head_dim = width // self.num_heads
        q = self.q_proj(embedded.to(demo_states.dtype) * self.embed_scale)
        q = q.view(b, side * side, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv_proj(demo_states).view(b, length, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        colour = torch.where(cells >= COLOR_OFFSET, cells, -1)[:, None, :, None]  # never equal to PAD or EOS
        weights = (self.colour_match * self.MATCH_SCALE).to(q.dtype)[:, None, :, None, None]
        bias = weights[0] * (colour == demo_colours[:, None, None, :]) + weights[1] * (
            colour == demo_partners[:, None, None, :]
        )
        bias = bias.masked_fill(~demo_attend[:, None, None, :], float("-inf"))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(attended.transpose(1, 2).reshape(b, side * side, width))


class GaussianLatent(nn.Module):
    """Diagonal Gaussian posterior q(z|x): a sample μ + σ·ε while training (when `sample`), else μ.

    Returns the KL(q ‖ N(0, I)) of each row, summed over latent dims, in float32.
    """

    def __init__(self, in_features: int, latent_dim: int, sample: bool = True):
        super().__init__()
        self.mean_logvar = CastedLinear(in_features, 2 * latent_dim, bias=True)
        self.sample = sample

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # KL summed over the latent needs float32
            mean, logvar = self.mean_logvar(x.float()).chunk(2, dim=-1)
        logvar = logvar.clamp(-LOGVAR_LIMIT, LOGVAR_LIMIT)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(-1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.training and self.sample else mean
        return z.to(x.dtype), kl


def context_linear(in_features: int, out_features: int, hidden_size: int) -> CastedLinear:
    """The last linear before the context, initialised to outputs of RMS ≈ 1/sqrt(hidden).

    The decoder multiplies its prefix by sqrt(hidden), as it does its token embeddings (whose
    tables hold values of that scale), so the context starts at the scale of a token embedding.
    """
    linear = CastedLinear(in_features, out_features)
    trunc_normal_init_(linear.weight, 1.0 / math.sqrt(in_features * hidden_size))
    return linear


class ContextProjection(nn.Module):
    """A vector per sample → `context_len` prefix tokens of the decoder's width."""

    def __init__(self, in_features: int, context_len: int, hidden_size: int):
        super().__init__()
        self.context_len = context_len
        self.proj = context_linear(in_features, context_len * hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).view(x.shape[0], self.context_len, -1)


def mean_over_present(values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """values [N, ...] for the present demos (row-major order of `present` [B, D]) → per-sample mean [B, ...].

    A sample without demos gets zeros.
    """
    owner = present.nonzero()[:, 0]
    sums = values.new_zeros((present.shape[0], *values.shape[1:])).index_add_(0, owner, values)
    counts = present.sum(dim=1).clamp(min=1).to(values.dtype)
    return sums / counts.view(-1, *([1] * (values.dim() - 1)))


def pack_present(present: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each of `values` [N, S, ...] (the present demos, row-major order of `present` [B, D]) → [B, M·S, ...],
    M = most demos any sample has; gaps are zeros. The slots are worked out once for all of them.
    """
    b = present.shape[0]
    slots = max(int(present.sum(dim=1).max().item()), 1)
    owner, slot_of_demo = present.nonzero()[:, 0], (present.cumsum(dim=1) - 1)[present]
    packed = []
    for v in values:
        out = v.new_zeros((b, slots, *v.shape[1:]))
        out[owner, slot_of_demo] = v
        packed.append(out.flatten(1, 2))
    return packed
