"""Demo encoders: set properties (order, padding, other rows), masking, KL, and the context's effect on ETRM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from etrm.config import RunConfig
from etrm.errors import EtrmError
from etrm.models.encoder_parts import CrossAttentionPool
from etrm.models.encoders import build_encoder
from etrm.models.layers import swiglu_inner_size

ENCODER_TYPES = ("standard", "hybrid_standard", "hybrid_variational", "lpn_var")
VARIATIONAL = ("hybrid_variational", "lpn_var")


def canvas_tokens(grid: np.ndarray) -> torch.Tensor:
    """TRM encoding written out independently: colours +2 top-left, EOS row below and column right."""
    h, w = grid.shape
    canvas = torch.zeros(30, 30, dtype=torch.int64)
    canvas[:h, :w] = torch.from_numpy(grid) + 2
    if h < 30:
        canvas[h, :w] = 1
    if w < 30:
        canvas[:h, w] = 1
    return canvas.view(900)


def random_pair(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 10, (h, w)), rng.integers(0, 10, (w, h))


def make_batch(rows: list[list[tuple[np.ndarray, np.ndarray]]], slots: int, garbage_in_empty: bool = False):
    """Each row's demos fill its first slots; empty slots are zeros, or random tokens with the mask False."""
    b = len(rows)
    gen = torch.Generator().manual_seed(123)
    batch = {
        "demo_inputs": torch.zeros(b, slots, 900, dtype=torch.int64),
        "demo_outputs": torch.zeros(b, slots, 900, dtype=torch.int64),
        "demo_mask": torch.zeros(b, slots, dtype=torch.bool),
    }
    if garbage_in_empty:
        batch["demo_inputs"] = torch.randint(0, 12, (b, slots, 900), generator=gen)
        batch["demo_outputs"] = torch.randint(0, 12, (b, slots, 900), generator=gen)
    for r, demos in enumerate(rows):
        for d, (grid_in, grid_out) in enumerate(demos):
            batch["demo_inputs"][r, d] = canvas_tokens(grid_in)
            batch["demo_outputs"][r, d] = canvas_tokens(grid_out)
            batch["demo_mask"][r, d] = True
    return batch


def place_demos(demos, slot_of_demo: list[int], slots: int):
    """One row with demo i in slot slot_of_demo[i], random tokens in the masked slots."""
    batch = make_batch([[]], slots, garbage_in_empty=True)
    single = make_batch([demos], len(demos))
    for d, slot in enumerate(slot_of_demo):
        for key in batch:
            batch[key][0, slot] = single[key][0, d]
    return batch


@pytest.fixture
def fresh_encoder(tiny_arch):
    """`fresh_encoder(encoder_type, seed=0, **overrides)`: a seeded encoder of the tiny model, in eval mode."""

    def build(encoder_type: str, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return build_encoder(tiny_arch(encoder_type, **overrides)).eval()

    return build


@pytest.fixture(scope="module")
def demos():
    rng = np.random.default_rng(0)
    return [random_pair(rng, 3, 4), random_pair(rng, 5, 2), random_pair(rng, 4, 4)]


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_context_invariant_to_demo_order_and_empty_slots(encoder_type, demos, fresh_encoder):
    encoder = fresh_encoder(encoder_type)
    with torch.no_grad():
        encoded = encoder(make_batch([demos], 3))
        reference, kl_reference = encoded.slots, encoded.kl
        encoded = encoder(place_demos(demos, [5, 0, 3], slots=7))
        shuffled, kl_shuffled = encoded.slots, encoded.kl
    assert reference.shape == (1, 4, 32)
    assert torch.allclose(reference, shuffled, atol=1e-5, rtol=1e-5)
    if encoder_type in VARIATIONAL:
        assert torch.allclose(kl_reference, kl_shuffled, atol=1e-5, rtol=1e-5)
    else:
        assert kl_reference is None and kl_shuffled is None


@pytest.mark.parametrize("encoder_type", VARIATIONAL)
def test_training_samples_ignore_empty_slots(encoder_type, demos, fresh_encoder):
    """With the same seed, trailing empty slots leave the sampled context unchanged."""
    encoder = fresh_encoder(encoder_type).train()
    with torch.no_grad():
        torch.manual_seed(5)
        reference = encoder(make_batch([demos, demos[:1]], 3)).slots
        torch.manual_seed(5)
        padded = encoder(make_batch([demos, demos[:1]], 6, garbage_in_empty=True)).slots
    assert torch.allclose(reference, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_context_of_a_row_does_not_depend_on_the_other_rows(encoder_type, demos, fresh_encoder):
    """Other rows' larger grids lengthen every demo's sequence; the padded tail must stay masked."""
    rng = np.random.default_rng(1)
    big = [random_pair(rng, 30, 30), random_pair(rng, 12, 7)]
    encoder = fresh_encoder(encoder_type)
    with torch.no_grad():
        alone = encoder(make_batch([demos], 3)).slots
        batched = encoder(make_batch([big, demos, demos[:1]], 4)).slots
    assert torch.allclose(alone[0], batched[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_grouping_demos_by_length_changes_cost_not_result(encoder_type, demos, fresh_encoder):
    """Encoding demos in length groups (each cut at its own longest) equals one padded batch, gradients too."""
    rng = np.random.default_rng(2)
    rows = [
        [random_pair(rng, 30, 30), random_pair(rng, 2, 3)],
        demos,
        [random_pair(rng, 9, 11), random_pair(rng, 1, 1), random_pair(rng, 6, 5)],
        demos[:1],
    ]
    batch = make_batch(rows, 3)
    results = {}
    for groups in (1, 3, 4):
        encoder = fresh_encoder(encoder_type)
        encoder.grid_encoder.length_groups = groups
        torch.manual_seed(9)  # the variational encoders sample in training mode
        encoded = encoder.train()(batch)
        context, kl = encoded.slots, encoded.kl
        loss = context.square().sum() + (kl.sum() if kl is not None else 0)
        loss.backward()
        results[groups] = (
            context.detach(),
            {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None},
        )
    context, grads = results[1]
    for groups in (3, 4):
        torch.testing.assert_close(results[groups][0], context, rtol=1e-5, atol=1e-6)
        assert results[groups][1].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(results[groups][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_single_demo_and_demo_less_rows_are_finite_with_zero_context(encoder_type, demos, fresh_encoder):
    encoder = fresh_encoder(encoder_type).train()
    batch = make_batch([demos[:1], [], demos], slots=3, garbage_in_empty=True)
    encoded = encoder(batch)
    context, kl = encoded.slots, encoded.kl
    assert torch.isfinite(context).all()
    assert torch.equal(context[1], torch.zeros_like(context[1]))
    assert context[0].abs().sum() > 0 and context[2].abs().sum() > 0
    loss = context.square().sum() + (kl.sum() if kl is not None else 0.0)
    loss.backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    if encoder_type in VARIATIONAL:
        assert torch.isfinite(kl).all() and kl[1] == 0 and (kl[[0, 2]] > 0).all()

    nothing = make_batch([[], []], slots=2, garbage_in_empty=True)
    encoded = encoder(nothing)
    context, kl = encoded.slots, encoded.kl
    assert context.shape == (2, 4, 32) and torch.equal(context, torch.zeros_like(context))
    assert kl is None or torch.equal(kl, torch.zeros(2))


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_changing_a_demo_changes_the_context(encoder_type, demos, fresh_encoder):
    encoder = fresh_encoder(encoder_type)
    changed = [(grid_in, grid_out.copy()) for grid_in, grid_out in demos]
    changed[1][1][0, 0] = (changed[1][1][0, 0] + 1) % 10
    with torch.no_grad():
        before = encoder(make_batch([demos], 3)).slots
        after = encoder(make_batch([changed], 3)).slots
    assert (before - after).abs().max() > 1e-4


@pytest.mark.parametrize("encoder_type", VARIATIONAL)
def test_variational_encoders_sample_in_training_and_use_the_mean_in_eval(encoder_type, demos, fresh_encoder):
    encoder = fresh_encoder(encoder_type, encoder_latent_dim=32, kl_weight=0.1)
    captured = {}
    encoder.latent.mean_logvar.register_forward_hook(lambda m, i, out: captured.update(stats=out.detach()))
    encoder.latent.register_forward_hook(lambda m, i, out: captured.update(z=out[0].detach()))
    batch = make_batch([demos, demos[:2], demos[1:]], 3)
    with torch.no_grad():
        encoded = encoder(batch)
        first, kl_eval = encoded.slots, encoded.kl
        second = encoder(batch).slots
        assert torch.equal(first, second)
        mean = captured["stats"].chunk(2, dim=-1)[0]
        assert torch.equal(captured["z"], mean)

        encoder.train()
        noise = []
        for _ in range(10):
            encoded = encoder(batch)
            context, kl_train = encoded.slots, encoded.kl
            mean, logvar = captured["stats"].chunk(2, dim=-1)
            noise.append((captured["z"] - mean) / torch.exp(0.5 * logvar))
        assert not torch.allclose(context, first)
        assert torch.allclose(kl_train, kl_eval)  # KL depends on the posterior, not on the sample
    noise = torch.cat(noise).flatten()
    assert noise.numel() >= 960
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1.0) < 0.1


@pytest.mark.parametrize(
    ("preset", "settings", "samples"),
    [
        ("SF3", [], False),  # the design's KL 0: deterministic
        ("SF3", ["arch.kl_weight=0.01"], True),
        ("SF3", ["arch.variational_sample=always"], True),
        ("SF3", ["arch.kl_weight=0.01", "arch.variational_sample=never"], False),
        ("E2b", ["arch.kl_weight=0"], False),  # lpn_var
        ("E2b", [], True),  # E2b's KL 1e-4
    ],
)
def test_kl_zero_means_deterministic_unless_variational_sample_says_otherwise(
    preset, settings, samples, demos
):
    from etrm.config import apply_overrides, get_preset

    arch = apply_overrides(get_preset(preset, size="cpu-smoke"), settings).arch
    torch.manual_seed(0)
    encoder = build_encoder(arch).train()
    batch = make_batch([demos, demos[:2]], 3)
    with torch.no_grad():
        first = encoder(batch).slots
        second = encoder(batch).slots
        mean = encoder.eval()(batch).slots
    assert torch.equal(first, second) is not samples
    assert torch.equal(first, mean) is not samples  # not sampling = the posterior mean, as in eval


def test_variational_sample_takes_three_values():
    from etrm.config import apply_overrides, get_preset

    with pytest.raises(
        EtrmError, match="arch.variational_sample must be one of auto, always, never, got 'yes'"
    ):
        apply_overrides(get_preset("SF3"), ["arch.variational_sample=yes"])


@pytest.mark.parametrize("encoder_type", VARIATIONAL)
def test_kl_matches_float64_closed_form(encoder_type, demos, fresh_encoder):
    encoder = fresh_encoder(encoder_type).train()
    captured = {}
    encoder.latent.mean_logvar.register_forward_hook(lambda m, i, out: captured.update(stats=out.detach()))
    rows = [demos, [], demos[:1], demos[1:]]
    kl = encoder(make_batch(rows, 3)).kl
    mean, logvar = captured["stats"].double().chunk(2, dim=-1)
    per_posterior = (0.5 * (mean**2 + logvar.exp() - 1.0 - logvar)).sum(-1)
    if encoder_type == "lpn_var":  # one posterior per present demo, averaged over each row's demos
        counts = [len(r) for r in rows]
        chunks = per_posterior.split(counts)
        expected = torch.stack([c.mean() if len(c) else torch.zeros((), dtype=torch.float64) for c in chunks])
    else:
        expected = torch.where(torch.tensor([len(r) > 0 for r in rows]), per_posterior, 0.0)
    assert kl.dtype == torch.float32 and kl.shape == (4,)
    assert torch.allclose(kl.double(), expected, rtol=1e-5, atol=1e-6)
    assert kl[1] == 0 and (kl[[0, 2, 3]] > 0).all()


def test_set_pool_matches_float64_per_sample_reference():
    """Masked cross-attention = plain softmax attention over each sample's attendable tokens only."""
    torch.manual_seed(0)
    width, heads = 12, 3
    pool = CrossAttentionPool(width, heads, 2.0, num_queries=5, eps=1e-5).double()
    tokens = torch.randn(3, 9, width, dtype=torch.float64)
    attend = torch.rand(3, 9) < 0.5
    attend[0, 0] = True
    attend[2] = False
    out = pool(tokens, attend)

    def rms_norm(x):
        return x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-5)

    head_dim = width // heads
    for b in range(3):
        q = (pool.queries @ pool.q_proj.weight.T).view(5, heads, head_dim).transpose(0, 1)
        k, v = (tokens[b, attend[b]] @ pool.kv_proj.weight.T).view(-1, 2, heads, head_dim).permute(1, 2, 0, 3)
        if attend[b].any():
            weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
            attended = (weights @ v).transpose(0, 1).reshape(5, width)
        else:
            attended = torch.zeros(5, width, dtype=torch.float64)
        h = rms_norm(attended @ pool.o_proj.weight.T + pool.queries)
        gate, up = (h @ pool.mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
        expected = rms_norm(torch.nn.functional.silu(gate) * up @ pool.mlp.down_proj.weight.T + h)
        assert torch.allclose(out[b], expected, atol=1e-10)


def test_parameter_count_matches_closed_form(tiny_arch):
    width, hidden, inner = 24, 32, swiglu_inner_size(24, 2.0)
    embeddings = (12 + 30 + 30 + 2 + 1) * width  # colours, rows, columns, sides, summary token
    block = width * 3 * width + width * width + width * 2 * inner + inner * width
    projection = width * 4 * hidden
    encoder = build_encoder(tiny_arch("standard"))
    assert sum(p.numel() for p in encoder.parameters()) == embeddings + 2 * block + projection


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_context_starts_at_the_token_embedding_scale(encoder_type, demos, fresh_encoder):
    """The decoder scales its prefix by sqrt(hidden) like its token embeddings (table RMS 1/sqrt(hidden))."""
    encoder = fresh_encoder(encoder_type, hidden_size=64)
    with torch.no_grad():
        context = encoder(make_batch([demos, demos[1:]], 3)).slots
    rms = context.square().mean().sqrt().item()
    assert 0.5 / 8 < rms < 2.0 / 8


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"context_len": 0}, "arch.context_len"),
        ({"context_len": 9}, "arch.context_len"),
        ({"encoder_hidden_size": 25}, "arch.encoder_hidden_size"),
        ({"encoder_num_layers": 0}, "arch.encoder_num_layers"),
        ({"encoder_type": "transformer"}, "arch.encoder_type"),
    ],
)
def test_config_rejects_bad_encoder_arch(overrides, named, tiny_arch):
    with pytest.raises(EtrmError, match=named):
        RunConfig(arch=tiny_arch(overrides.pop("encoder_type", "hybrid_standard"), **overrides)).validate()


def episode_batch(demo_rows, slots: int) -> dict:
    """An ETRM training batch: the demos plus a query per row."""
    rng = np.random.default_rng(7)
    batch = make_batch(demo_rows, slots)
    queries = [canvas_tokens(rng.integers(0, 10, (4, 3))) for _ in demo_rows]
    batch["inputs"] = torch.stack(queries)
    batch["labels"] = torch.where(batch["inputs"] == 0, -100, batch["inputs"])
    batch["puzzle_identifiers"] = torch.zeros(len(demo_rows), dtype=torch.int64)
    return batch


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_changing_the_demos_changes_the_decoder_output(encoder_type, demos, tiny_arch):
    from etrm.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_arch(encoder_type)).eval()
    changed = [(grid_in, np.rot90(grid_out).copy()) for grid_in, grid_out in demos]
    with torch.no_grad():
        logits = []
        for rows in ([demos, demos], [demos, changed]):
            batch = episode_batch(rows, 3)
            _, outputs = model(model.initial_carry(batch), batch)
            logits.append(outputs["logits"])
    assert torch.allclose(logits[0][0], logits[1][0], atol=1e-5)  # row 0 kept its demos
    assert (logits[0][1] - logits[1][1]).abs().max() > 1e-4


@pytest.mark.parametrize("reencode", [True, False])
def test_encoder_gradient_at_each_act_step_follows_encoder_reencode(reencode, demos, tiny_arch):
    """Re-encoding: gradient at every step; caching: only at steps where some row (re)started."""
    from etrm.models import build_model
    from etrm.models.losses import ACTLossHead

    torch.manual_seed(0)
    arch = tiny_arch(
        "hybrid_variational",
        encoder_reencode=reencode,
        halt_max_steps=2,
        halt_exploration_prob=0.0,
        kl_weight=0.1,
    )
    head = ACTLossHead(build_model(arch)).train()
    batch = episode_batch([demos, demos[:1]], 3)
    carry = head.initial_carry(batch)
    restarted, encoder_got_gradient = [], []
    for _ in range(4):
        restarted.append(bool(carry.halted.any()))
        head.zero_grad(set_to_none=True)
        carry, loss, *_ = head(carry, batch)
        loss.backward()
        grads = [p.grad for p in head.model.encoder.parameters() if p.grad is not None]
        encoder_got_gradient.append(any(g.abs().sum() > 0 for g in grads))
    assert restarted == [True, False, True, False]  # halt_max_steps=2, no exploration
    assert encoder_got_gradient == ([True] * 4 if reencode else restarted)
