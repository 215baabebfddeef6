import json

import pytest

from etrm.config import (
    CPU_SMOKE_SIZE,
    PRESETS,
    RunConfig,
    apply_overrides,
    config_to_dict,
    get_preset,
    load_config,
)
from etrm.errors import EtrmError


def test_semi_final_presets_match_the_experiment_design():
    expected = {  # encoder, encoder layers, explore, batch, kl
        "SF1": ("hybrid_standard", 4, 0.5, 128, 0.0),
        "SF2": ("hybrid_standard", 4, 0.7, 128, 0.0),
        "SF3": ("hybrid_variational", 4, 0.5, 128, 0.0),
        "SF4": ("hybrid_variational", 4, 0.7, 128, 0.0),
        "SF5": ("standard", 2, 0.5, 256, 0.0),
        "SF6": ("standard", 2, 0.7, 256, 0.0),
    }
    for name, (enc, layers, explore, batch, kl) in expected.items():
        c = get_preset(name)
        assert (c.arch.encoder_type, c.arch.encoder_num_layers, c.arch.halt_exploration_prob) == (
            enc,
            layers,
            explore,
        )
        assert (c.train.global_batch_size, c.arch.kl_weight) == (batch, kl)
        assert (c.arch.halt_max_steps, c.train.lr, c.train.grad_clip) == (16, 1e-4, 1.0)
        assert (c.train.epochs, c.train.eval_interval, c.arch.encoder_reencode) == (1000, 200, True)
        assert (c.arch.hidden_size, c.arch.num_heads, c.arch.L_layers, c.arch.context_len) == (512, 8, 2, 16)
        assert PRESETS[name].phase == "semi-final"


def test_overfit_final_and_baseline_presets():
    for name, enc, layers, explore in [
        ("E1a", "standard", 2, 0.5),
        ("E1b", "standard", 2, 0.3),
        ("E1d", "standard", 2, 0.7),
        ("E2a", "hybrid_variational", 4, 0.5),
        ("E2b", "lpn_var", 6, 0.5),
        ("E2c", "hybrid_standard", 4, 0.5),
    ]:
        c = get_preset(name)
        assert (c.arch.encoder_type, c.arch.encoder_num_layers, c.arch.halt_exploration_prob) == (
            enc,
            layers,
            explore,
        )
        assert c.data.max_train_groups == 32
    final = get_preset("final")
    assert (final.train.epochs, final.train.checkpoint_interval) == (50000, 5000)
    assert get_preset("trm").arch.encoder_type == "puzzle_embedding"


def test_cpu_smoke_size_keeps_the_experiment_but_shrinks_the_model():
    full, small = get_preset("SF4"), get_preset("SF4", size="cpu-smoke")
    assert small.arch.encoder_type == full.arch.encoder_type
    assert small.arch.halt_exploration_prob == full.arch.halt_exploration_prob
    assert small.arch.hidden_size == 32 and small.train.global_batch_size == 4
    assert get_preset("cpu-smoke").arch.hidden_size == 32
    assert len(CPU_SMOKE_SIZE) > 0


def test_overrides_are_typed_and_do_not_touch_the_original():
    base = get_preset("SF2")
    c = apply_overrides(
        base, ["arch.hidden_size=64", "train.ema=false", "train.lr=3e-4", "logging.run_name=x"]
    )
    assert (c.arch.hidden_size, c.train.ema, c.train.lr, c.logging.run_name) == (64, False, 3e-4, "x")
    assert isinstance(c.train.lr, float) and isinstance(c.arch.hidden_size, int)
    assert base.arch.hidden_size == 512 and base.train.ema is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("arch.hiden_size=64", "did you mean 'arch.hidden_size'"),
        ("train.epoch=5", "did you mean 'train.epochs'"),
        ("arch.hidden_size=big", "arch.hidden_size must be int"),
        ("train.ema=maybe", "train.ema must be bool"),
        ("train.lr", "expected KEY=VALUE"),
        ("arch.encoder_type=lstm", "arch.encoder_type must be one of"),
        ("arch.num_heads=3", "arch.num_heads must be a divisor"),
        ("arch.context_len=17", "arch.context_len must be between 1 and 16"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(EtrmError, match=message.replace("(", r"\(")):
        apply_overrides(RunConfig(), [override])


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(EtrmError, match="did you mean 'SF2'"):
        get_preset("sf2")


def test_config_round_trips_through_json(tmp_path):
    c = apply_overrides(get_preset("SF3"), ["arch.kl_weight=0.01", "data.path=/x/y"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_to_dict(c)))
    assert load_config(path) == c


def test_partial_config_file_lays_over_a_base(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"train": {"epochs": 7}, "arch": {"hidden_size": 128}}))
    c = load_config(path, base=get_preset("SF5"))
    assert (c.train.epochs, c.arch.hidden_size, c.arch.encoder_type) == (7, 128, "standard")
    path.write_text(json.dumps({"train": {"epochz": 7}}))
    with pytest.raises(EtrmError, match=r"partial.json.*did you mean 'train.epochs'"):
        load_config(path)
    path.write_text(json.dumps({"train": {"epochs": "many"}}))
    with pytest.raises(EtrmError, match="train.epochs must be int"):
        load_config(path)
    path.write_text("{not json")
    with pytest.raises(EtrmError, match="not valid JSON"):
        load_config(path)
    with pytest.raises(EtrmError, match="does not exist"):
        load_config(tmp_path / "missing.json")


SOURCES = {"design", "reference TRM", "public ETRM", "our choice"}


def test_presets_log_under_the_designs_projects_and_run_names():
    names = {n: (get_preset(n).logging.project, get_preset(n).logging.run_name) for n in PRESETS}
    assert names["SF1"] == ("etrm-semi-final", "SF1_hybrid_std_explore0.5")
    assert names["SF2"] == ("etrm-semi-final", "SF2_hybrid_std_explore0.7")
    assert names["SF3"] == ("etrm-semi-final", "SF3_hybrid_var_explore0.5")
    assert names["SF6"] == ("etrm-semi-final", "SF6_standard_explore0.7")
    assert names["E1b"] == ("etrm-overfit", "E1b_standard_explore0.3")
    assert names["E2b"] == ("etrm-overfit", "E2b_lpn_var_explore0.5")
    overridden = apply_overrides(get_preset("SF2"), ["logging.run_name=mine", "logging.project=p"])
    assert (overridden.logging.project, overridden.logging.run_name) == ("p", "mine")


def test_every_preset_value_states_its_source_and_matches_the_config():
    from etrm.config import preset_sources

    for name in PRESETS:
        assert {s["source"] for s in preset_sources(name).values()} <= SOURCES, name
    assert preset_sources("cpu-smoke")["arch.hidden_size"] == {"value": 32, "source": "our choice"}
    sf = preset_sources("SF2")
    assert sf["train.lr_min_ratio"] == {"value": 0.1, "source": "our choice"}
    assert sf["arch.halt_exploration_prob"] == {"value": 0.7, "source": "design"}
    assert sf["train.lr"] == {"value": 1e-4, "source": "reference TRM"}
    assert preset_sources("E2a")["train.global_batch_size"] == {"value": 128, "source": "public ETRM"}


def test_semi_final_presets_anneal_with_cosine_to_a_floor():
    from etrm.train.schedule import lr_factor

    t = get_preset("SF2").train
    assert t.lr_min_ratio == 0.1
    total = 1000
    assert lr_factor(t.lr_warmup_steps, t.lr_warmup_steps, total, t.lr_min_ratio) == 1.0
    assert lr_factor(total, t.lr_warmup_steps, total, t.lr_min_ratio) == pytest.approx(0.1)
    middle = (t.lr_warmup_steps + total) / 2
    assert lr_factor(middle, t.lr_warmup_steps, total, t.lr_min_ratio) == pytest.approx(0.55)


def test_the_trm_preset_pretrains_on_the_few_shot_build():
    trm, baseline = get_preset("trm"), get_preset("trm-split")
    assert trm.data.path == "data/arc-agi-1" and trm.arch.encoder_type == "puzzle_embedding"
    assert PRESETS["trm"].phase == "pretrain" and baseline.data.path == "data/arc-agi-1-trm"
    assert (trm.train.global_batch_size, trm.train.grad_clip, trm.train.lr_min_ratio) == (768, 0.0, 1.0)
