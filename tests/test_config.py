import pytest

from tinylm import config as configlib
from tinylm.errors import UserError
from tinylm.stages.pretrain import PretrainConfig


def test_presets_load_and_overrides_apply():
    cfg = configlib.load(PretrainConfig, "shakespeare-char", ["train.steps=7", "model.depth=3"])
    assert cfg.train.steps == 7
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (3, 192, 3)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UserError, match="unknown config key 'model.dept'.*model.depth"):
        configlib.load(PretrainConfig, None, ["model.dept=3"])


def test_wrong_type_is_named():
    with pytest.raises(UserError, match="train.steps must be int, got str"):
        configlib.load(PretrainConfig, None, ["train.steps=many"])


def test_int_is_accepted_for_float():
    assert configlib.load(PretrainConfig, None, ["train.lr=1"]).train.lr == 1.0


def test_invalid_value_reported_by_dataclass():
    with pytest.raises(UserError, match="divisible"):
        configlib.load(PretrainConfig, None, ["model.d_model=30", "model.n_head=4"])


def test_saved_config_round_trips(tmp_path):
    cfg = configlib.load(PretrainConfig, "shakespeare-char", ["train.steps=9"])
    configlib.save(cfg, tmp_path / "config.toml")
    again = configlib.load(PretrainConfig, str(tmp_path / "config.toml"))
    assert again == cfg


def test_missing_preset_lists_presets():
    with pytest.raises(UserError, match="shakespeare-char"):
        configlib.load(PretrainConfig, "no-such-preset")


def test_every_shipped_preset_loads_into_a_stage_config():
    """A typo'd key or a wrong type in a preset fails here, not when a user runs it."""
    from tinylm.experiments.bottleneck import BottleneckConfig
    from tinylm.stages import STAGES
    from tinylm.stages.rlhf import RLHFConfig

    classes = [s.config_cls for s in STAGES.values()] + [RLHFConfig, BottleneckConfig]
    for path in sorted(configlib.PRESET_DIR.glob("*.toml")):
        loaded = []
        for cls in classes:
            try:
                loaded.append(configlib.load(cls, str(path)))
            except UserError:
                continue
        assert loaded, f"{path.name} loads into no stage's config"
