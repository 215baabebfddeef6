"""TRM decoder + ACT wrapper + loss head: sizes, halting rules, caching, losses against independent math."""

import functools
import math

import pytest
import torch

from etrm.config import ArchConfig, RunConfig
from etrm.errors import EtrmError
from etrm.models import build_model
from etrm.models.encoders import EncoderOutput
from etrm.models.losses import ACTLossHead, stablemax_cross_entropy

SIDE = 10  # a 10×10 corner of the 30×30 canvas (arch.seq_len=100) keeps these tests quick


@pytest.fixture
def tiny_arch(tiny_arch):
    """The shared tiny model with TRM's puzzle-id table as its context and 4 ACT steps: the decoder's own tests."""
    return functools.partial(
        tiny_arch, "puzzle_embedding", num_puzzle_identifiers=6, seq_len=SIDE * SIDE, halt_max_steps=4
    )


def random_batch(batch_size=3, seed=0):
    """Random tokens in the canvas corner; labels on its first half, -100 elsewhere (as PAD is)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.zeros(batch_size, 30, 30, dtype=torch.long)
    labels = torch.full((batch_size, 30, 30), -100)
    inputs[:, :SIDE, :SIDE] = torch.randint(0, 12, (batch_size, SIDE, SIDE), generator=g)
    labels[:, : SIDE // 2, :SIDE] = torch.randint(0, 12, (batch_size, SIDE // 2, SIDE), generator=g)
    return {
        "inputs": inputs.view(batch_size, 900),
        "labels": labels.view(batch_size, 900),
        "puzzle_identifiers": torch.arange(1, batch_size + 1),
    }


def test_arc_size_trm_has_the_reference_parameter_count():
    arch = ArchConfig(encoder_type="puzzle_embedding", num_puzzle_identifiers=10)
    model = build_model(arch)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6_829_058
    # The puzzle table is a buffer (sign-SGD trained), zero at init, one 512-wide slot.
    assert model.encoder.weights.shape == (10, 512) and not model.encoder.weights.any()
    assert model.encoder.num_slots == 1
    assert model.decoder.q_head.bias.tolist() == [-5.0, -5.0] and not model.decoder.q_head.weight.any()


def test_bad_arch_is_a_clear_error(tiny_arch):
    with pytest.raises(EtrmError, match="num_puzzle_identifiers"):
        build_model(tiny_arch(num_puzzle_identifiers=0))
    with pytest.raises(EtrmError, match="forward_dtype"):
        RunConfig(arch=tiny_arch(forward_dtype="float16")).validate()
    with pytest.raises(EtrmError, match="num_heads"):
        RunConfig(arch=tiny_arch(num_heads=3)).validate()


def test_stablemax_cross_entropy_matches_scalar_formula():
    logits = torch.tensor([[[-2.0, 0.5, 3.0], [0.0, -0.25, 1.0]]])
    labels = torch.tensor([[2, -100]])

    def s(x):
        return 1 / (1 - x) if x < 0 else x + 1

    expected = -math.log(s(3.0) / (s(-2.0) + s(0.5) + s(3.0)))
    loss = stablemax_cross_entropy(logits, labels)
    assert loss.dtype == torch.float64
    assert loss[0, 0].item() == pytest.approx(expected, rel=1e-12)
    assert loss[0, 1].item() == 0.0


def test_stablemax_gradient_is_finite_at_a_logit_of_exactly_one():
    """bfloat16 logits hit 1.0 exactly; the unpicked 1/(1−x) branch must not turn 0·inf into NaN."""
    logits = torch.tensor([[[1.0, -0.5, 2.0, 0.0]]], dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([[0]])
    stablemax_cross_entropy(logits, labels).sum().backward()
    # d/dx of −log(s0/Σs) by hand, s = (2, 2/3, 3, 1): ds/dx is 1 for x ≥ 0 and 1/(1−x)² below.
    total = 2 + 2 / 3 + 3 + 1
    ds = torch.tensor([1.0, 4 / 9, 1.0, 1.0], dtype=torch.float64)
    expected = ds / total
    expected[0] -= 1 / 2
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad[0, 0].double(), expected, rtol=1e-2, atol=1e-3)


def test_eval_runs_every_step_whatever_q_says(tiny_arch):
    model = build_model(tiny_arch()).eval()
    with torch.no_grad():
        model.decoder.q_head.bias.fill_(5.0)  # the Q head says "halt now"
    batch = random_batch()
    carry = model.initial_carry(batch)
    with torch.no_grad():
        for step in range(1, 5):
            carry, _ = model(carry, batch)
            assert carry.steps.tolist() == [step] * 3
            assert carry.halted.tolist() == [step == 4] * 3


@pytest.mark.parametrize("no_act_continue", [True, False])
def test_training_halts_when_q_says_so(no_act_continue, tiny_arch):
    model = build_model(tiny_arch(halt_exploration_prob=0.0, no_ACT_continue=no_act_continue)).train()
    with torch.no_grad():
        model.decoder.q_head.bias.copy_(torch.tensor([5.0, -5.0]))  # q_halt > 0 and > q_continue
    batch = random_batch()
    carry, _ = model(model.initial_carry(batch), batch)
    assert carry.halted.all() and carry.steps.tolist() == [1, 1, 1]
    with torch.no_grad():
        model.decoder.q_head.bias.copy_(torch.tensor([-5.0, 5.0]))
    carry, _ = model(model.initial_carry(batch), batch)
    assert not carry.halted.any()


def test_exploration_forces_a_minimum_of_two_steps(tiny_arch):
    model = build_model(tiny_arch(halt_exploration_prob=1.0)).train()
    with torch.no_grad():
        model.decoder.q_head.bias.fill_(5.0)
    batch = random_batch()
    carry, _ = model(model.initial_carry(batch), batch)
    assert not carry.halted.any()  # minimum drawn from 2..4, so nobody may stop after one step


def test_target_q_continue_is_the_next_steps_q_values(tiny_arch):
    model = build_model(tiny_arch(no_ACT_continue=False, halt_exploration_prob=0.0, halt_max_steps=2)).train()
    with torch.no_grad():
        model.decoder.q_head.weight.normal_(0, 0.5)
    batch = random_batch()
    head = ACTLossHead(model)
    carry = head.initial_carry(batch)
    for _ in range(2):
        carry, loss, metrics, outputs, _ = head(carry, batch)
        loss.backward()
        with torch.no_grad():
            context = model.encoder(carry.current_data).slots
            corner = carry.current_data["inputs"].view(-1, 30, 30)[:, :SIDE, :SIDE].reshape(-1, SIDE * SIDE)
            *_, next_halt, next_continue = model.decoder(carry.z_H, carry.z_L, corner, context)
        last = carry.steps >= 2
        expected = torch.sigmoid(torch.where(last, next_halt, torch.maximum(next_halt, next_continue)))
        torch.testing.assert_close(outputs["target_q_continue"], expected)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            outputs["q_continue_logits"], expected, reduction="sum"
        )
        assert metrics["q_continue_loss"].item() == pytest.approx(bce.item(), rel=1e-5)


@pytest.mark.parametrize("reencode", [True, False])
def test_encoder_reencode_false_caches_the_context_until_reset(reencode, tiny_arch):
    model = build_model(tiny_arch(encoder_reencode=reencode)).eval()
    batch = random_batch()
    carry = model.initial_carry(batch)
    with torch.no_grad():
        model.encoder.weights.fill_(1.0)
        carry, out1 = model(carry, batch)
        model.encoder.weights.fill_(2.0)
        carry.halted = torch.tensor([True, False, False])
        carry, out2 = model(carry, batch)
    assert out1["context"][:, 0].eq(1.0).all()
    assert out2["context"][0, 0].eq(2.0).all()  # the reset row is always re-encoded
    assert out2["context"][1:, 0].eq(1.0 if not reencode else 2.0).all()
    assert (carry.context is None) == reencode


def test_loss_adds_weighted_kl_and_counts_only_halted_rows(monkeypatch, tiny_arch):
    arch = tiny_arch(halt_max_steps=1, kl_weight=0.25)
    model = build_model(arch).eval()
    head = ACTLossHead(model)
    batch = random_batch()
    batch["labels"][2] = -100  # a row with no label is never counted
    with torch.no_grad():
        carry, loss, metrics, outputs, all_halted = head(head.initial_carry(batch), batch)
        kl = torch.tensor([0.5, 1.0, 2.0])
        encode = model.encoder.forward
        monkeypatch.setattr(model.encoder, "forward", lambda b: EncoderOutput(encode(b).slots, kl=kl))
        _, loss_kl, metrics_kl, _, _ = head(head.initial_carry(batch), batch)
    assert all_halted
    assert (loss_kl - loss).item() == pytest.approx(0.25 * 3.5, rel=1e-6)
    assert metrics_kl["kl_loss"].item() == pytest.approx(3.5)
    assert metrics["count"].item() == 2 and metrics["steps"].item() == 2
    labels = batch["labels"][:2]
    preds = outputs["preds"][:2]
    mask = labels != -100
    expected_acc = ((preds == labels) & mask).sum(-1).double() / mask.sum(-1)
    assert metrics["accuracy"].item() == pytest.approx(expected_acc.sum().item(), rel=1e-6)
    # The lm loss is the per-sample mean over labelled cells, summed over the batch.
    per_cell = stablemax_cross_entropy(outputs["logits"], batch["labels"])
    expected_lm = (per_cell.sum(-1) / (batch["labels"] != -100).sum(-1).clamp_min(1)).sum()
    assert metrics["lm_loss"].item() == pytest.approx(expected_lm.item(), rel=1e-12)


def test_sign_sgd_updates_only_touched_rows_like_trm(tiny_arch):
    model = build_model(tiny_arch(puzzle_emb_ndim=40)).train()
    table = model.encoder
    with torch.no_grad():
        table.weights.normal_()
    before = table.weights.clone()
    batch = random_batch()
    batch["puzzle_identifiers"] = torch.tensor([2, 4, 2])
    head = ACTLossHead(model)
    _, loss, *_ = head(head.initial_carry(batch), batch)
    loss.backward()
    ids, grads = table.take_sparse_grads()
    assert ids.tolist() == [2, 4, 2] and grads.shape == (3, 40) and grads.abs().min() > 0
    assert table.take_sparse_grads() is None
    table.sign_sgd_step(ids, grads, lr=0.1, weight_decay=0.5)
    expected = before.clone()
    for row, grad in ((2, grads[0] + grads[2]), (4, grads[1])):
        expected[row] = before[row] * (1 - 0.1 * 0.5) - 0.1 * torch.sign(grad)
    torch.testing.assert_close(table.weights, expected, rtol=0, atol=1e-7)


def test_bfloat16_forward_keeps_latents_in_bf16_and_tracks_float32(tiny_arch):
    """forward_dtype=bfloat16 (what 'auto' picks on CUDA): bf16 latents/logits, float32 Q, close to float32."""
    fp32 = build_model(tiny_arch()).eval()
    bf16 = build_model(tiny_arch(forward_dtype="bfloat16")).eval()
    with torch.no_grad():
        fp32.encoder.weights.normal_()
    bf16.load_state_dict(fp32.state_dict())
    batch = random_batch()
    with torch.no_grad():
        _, out32 = fp32(fp32.initial_carry(batch), batch)
        carry, out16 = bf16(bf16.initial_carry(batch), batch)
    assert carry.z_H.dtype == carry.z_L.dtype == out16["logits"].dtype == torch.bfloat16
    assert out16["q_halt_logits"].dtype == torch.float32
    assert fp32.compute_dtype(torch.device("cpu")) == torch.float32
    assert fp32.compute_dtype(torch.device("cuda")) == torch.bfloat16  # 'auto'
    diff = (out16["logits"].float() - out32["logits"]).abs()
    assert diff.mean() < 0.03 * out32["logits"].abs().mean()
    assert (out16["logits"].argmax(-1) == out32["logits"].argmax(-1)).float().mean() > 0.97


def test_small_canvas_decodes_the_corner_and_predicts_pad_outside(tiny_arch):
    model = build_model(tiny_arch())
    batch = random_batch()
    head = ACTLossHead(model)
    _, loss, _, outputs, _ = head(head.initial_carry(batch), batch)
    logits = outputs["logits"].view(3, 30, 30, 12)
    assert logits.shape == (3, 30, 30, 12)
    assert (logits[:, SIDE:].argmax(-1) == 0).all() and (logits[:, :, SIDE:].argmax(-1) == 0).all()
    loss.backward()  # labels live only in the corner, so the whole loss reaches the decoder
    assert model.decoder.lm_head.weight.grad.abs().sum() > 0
    too_big = random_batch()
    too_big["inputs"].view(3, 30, 30)[1, 3, SIDE] = 2
    with pytest.raises(EtrmError, match="too small for a grid"):
        model(model.initial_carry(too_big), too_big)
    label_outside = random_batch()
    label_outside["labels"].view(3, 30, 30)[0, SIDE, 0] = 1
    with pytest.raises(EtrmError, match="too small for a grid"):
        model(model.initial_carry(label_outside), label_outside)
    with pytest.raises(EtrmError, match="arch.seq_len must be a square"):
        RunConfig(arch=tiny_arch(seq_len=120)).validate()


def test_only_the_last_h_cycle_is_backpropagated(tiny_arch):
    """H_cycles=3, L_cycles=2: the shared net runs 9 times per step, but gradient flows through 3 (2 z_L + 1 z_H)."""
    model = build_model(tiny_arch(H_cycles=3, L_cycles=2, halt_max_steps=2)).train()
    backward_calls = []
    model.decoder.L_level.layers[0].register_full_backward_hook(lambda *_: backward_calls.append(1))
    forward_calls = []
    model.decoder.L_level.layers[0].register_forward_hook(lambda *_: forward_calls.append(1))
    batch = random_batch()
    head = ACTLossHead(model)
    carry, loss, *_ = head(head.initial_carry(batch), batch)
    loss.backward()
    assert len(forward_calls) == 9 and len(backward_calls) == 3
    assert not carry.z_H.requires_grad and not carry.z_L.requires_grad
