"""The config tree: presets, dotted overrides, strict keys and types, validation messages that name the fix."""

import pytest
import yaml

from longctx.config import ConfigError, PrepConfig, RunConfig, describe, from_dict, load_config, save_config, to_dict


def _run(overrides, tmp_path=None, preset=None):
    base = ["model.init={model_type: llama}"]
    return load_config(RunConfig, preset, base + overrides)


def test_defaults_follow_longlora():
    cfg = _run([])
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16 and cfg.lora.dropout == 0
    assert cfg.lora.trainable == ["embed", "norm"]
    assert cfg.train.adam_betas == [0.9, 0.95] and cfg.train.warmup_steps == 20 and cfg.train.lr == 2e-5


def test_preset_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    tree = {"train": {"lr": 1e-5, "seq_len": 4096}, "model": {"init": {"model_type": "llama"}}}
    preset.write_text(yaml.safe_dump(tree))
    cfg = load_config(RunConfig, preset, ["train.lr=3e-4", "lora.target_modules=[q_proj,v_proj]", "lora.enabled=false"])
    assert cfg.train.lr == 3e-4 and cfg.train.seq_len == 4096
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.lora.enabled is False
    assert cfg.group_size == 1024


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key train\.lrr: did you mean train\.lr\?"):
        _run(["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key trian: did you mean train\?"):
        _run(["trian.lr=1"])


def test_type_errors_are_collected_in_one_line():
    with pytest.raises(ConfigError) as e:
        _run(["train.max_steps=many", "lora.enabled=maybe", "attention.implementation=fast"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "train.max_steps='many' must be a whole number" in msg
    assert "lora.enabled='maybe' must be true or false" in msg
    assert "attention.implementation='fast' is not allowed: choose one of s2attn" in msg


def test_bad_combinations_name_the_fix():
    with pytest.raises(ConfigError, match="exceeds train.seq_len=1024"):
        _run(["train.seq_len=1024", "attention.group_size=2048"])
    with pytest.raises(ConfigError, match="not a multiple of parallel.sequence_parallel_size=3"):
        _run(["train.seq_len=1024", "parallel.sequence_parallel_size=3"])
    with pytest.raises(ConfigError, match="neither model.path nor model.init"):
        load_config(RunConfig, None, [])
    with pytest.raises(ConfigError, match="one weight per input"):
        load_config(PrepConfig, None, ["inputs=[a,b]", "weights=[1.0]"])
    with pytest.raises(ConfigError, match="seq_len=1 is too small"):
        load_config(PrepConfig, None, ["seq_len=1"])


def test_bad_override_syntax_and_missing_preset(tmp_path):
    with pytest.raises(ConfigError, match="is not key=value"):
        _run(["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(RunConfig, tmp_path / "nope.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(RunConfig, bad, [])


def test_saved_config_round_trips(tmp_path):
    cfg = _run(["train.lr=1e-4", "attention.isolate_documents=true"])
    save_config(cfg, tmp_path / "config.yaml")
    again = from_dict(RunConfig, yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)
    assert not (tmp_path / "config.yaml.tmp").exists()


def test_every_field_is_documented():
    for cls in (RunConfig, PrepConfig):
        for key, _, doc in describe(cls):
            assert doc, f"{cls.__name__}.{key} has no doc string"
