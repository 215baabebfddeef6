"""benchmarks/bench_overfit.py: each overfit preset keeps its encoder and takes the CPU recipe's sizes."""

import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import results  # noqa: E402
from bench_overfit import overfit_config  # noqa: E402


def test_each_preset_keeps_its_encoder_at_the_recipe_sizes(tmp_path):
    args = Namespace(max_grid=10, groups=32, minutes=15.0, steps=1750, seed=3, settings=["train.lr=2e-3"])
    expected = {  # encoder, encoder layers, exploration, KL weight: as in etrm/config.py's presets
        "E1a": ("standard", 2, 0.5, 0.0),
        "E1b": ("standard", 2, 0.3, 0.0),
        "E1d": ("standard", 2, 0.7, 0.0),
        "E2a": ("hybrid_variational", 4, 0.5, 1e-4),
        "E2b": ("lpn_var", 6, 0.5, 1e-4),
        "E2c": ("hybrid_standard", 4, 0.5, 0.0),
    }
    for preset, (encoder, layers, explore, kl) in expected.items():
        cfg = overfit_config(preset, tmp_path / "data", args)
        a, t = cfg.arch, cfg.train
        assert (a.encoder_type, a.encoder_num_layers, a.halt_exploration_prob, a.kl_weight) == (
            encoder, layers, explore, kl,
        )  # fmt: skip
        assert (a.hidden_size, a.halt_max_steps, a.H_cycles, a.L_cycles) == (64, 2, 2, 1)  # the recipe's
        assert a.cell_lookup and a.seq_len == 121  # an 11×11 corner: 10×10 grids and their EOS
        assert cfg.train.init_from == "none"  # the presets demand a decoder choice; this one is on purpose
        assert cfg.data.max_train_groups == 32 and cfg.data.path == str(tmp_path / "data")
        assert (t.max_minutes, t.max_steps, t.seed, t.lr, t.global_batch_size) == (15.0, 1750, 3, 2e-3, 32)


def test_csv_rows_are_appended_under_one_header(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    path = results.append_rows("rows", ["a", "b"], [{"a": 1, "b": "x,y"}])
    results.append_rows("rows", ["a", "b"], [{"a": 2, "b": 0.5}, {"a": 3, "b": ""}])
    assert path.read_text() == 'a,b\n1,"x,y"\n2,0.5\n3,\n'
