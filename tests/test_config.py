"""Config: YAML plus --set overrides, and errors that name the key and the closest valid one."""

from pathlib import Path

import pytest

from dstune.config import ConfigError, RunConfig, load_config, save_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.method == "lora" and cfg.optim.max_grad_norm == 1.0 and cfg.data.split == (0.8, 0.1, 0.1)


def test_overrides_parse_yaml_values(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method: full\noptim:\n  lr: 1.0e-5\nlora:\n  targets: mlp\n")
    cfg = load_config(f, overrides=["optim.lr=2e-4", "lora.r=16", "lora.targets=[q_proj, v_proj]",
                                    "train.max_steps=null", "data.split=[0.9, 0.05, 0.05]"],
                      values={"output": "runs/x", "train.epochs": None})
    assert cfg.method == "full"
    assert cfg.optim.lr == 2e-4 and cfg.lora.r == 16 and cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None and cfg.output == "runs/x" and cfg.data.split == (0.9, 0.05, 0.05)


@pytest.mark.parametrize("override, expected", [
    ("optim.learning_rate=1e-4", "did you mean 'optim.lr'"),
    ("lora.rank=4", "did you mean 'lora.r'"),
    ("train.precison=bf16", "did you mean 'train.precision'"),
    ("trian.seed=1", "did you mean 'train.seed'"),
])
def test_unknown_override_names_closest_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert override.split("=")[0] in str(err.value) and expected in str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lr: 1e-4\n  warmup_step: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "bad.yaml" in msg and "optim.warmup_step" in msg and "optim.warmup_steps" in msg


@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"), ("method=prefixx", "method"), ("train.precision=fp8", "train.precision"),
    ("data.split=[0.5, 0.5, 0.5]", "data.split"), ("lora.r=0", "lora.r"),
])
def test_invalid_value_names_key_and_value(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert key in str(err.value)


def test_remote_code_needs_pinned_revision():
    with pytest.raises(ConfigError, match="revision"):
        load_config(overrides=["model.trust_remote_code=true"])
    cfg = load_config(overrides=["model.trust_remote_code=true", "model.revision=abc123"])
    assert cfg.model.trust_remote_code


def test_save_and_reload_roundtrip(tmp_path):
    # What a run saves is its config with absolute paths (a relative one in a file is read relative to it).
    cfg = load_config(overrides=["optim.lr=3e-4", "data.train=../x.jsonl", "freeze.patterns=['norm']"]).absolute()
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_relative_paths_in_a_config_file_are_relative_to_the_file(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text("data:\n  train: data/x.jsonl\n  mix: []\nmodel:\n  name: smollm2\n")
    cfg = load_config(tmp_path / "cfg" / "run.yaml")
    assert cfg.data.train == str(tmp_path / "cfg" / "data" / "x.jsonl") and cfg.model.name == "smollm2"
    flag = load_config(tmp_path / "cfg" / "run.yaml", overrides=["data.train=y.jsonl"])
    assert flag.data.train == "y.jsonl" and flag.absolute().data.train == str(Path.cwd() / "y.jsonl")


def test_set_without_equals_is_explained():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(overrides=["optim.lr"])


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_validates(path):
    cfg = load_config(path)
    files = [cfg.data.train] if cfg.data.train else [m.path for m in cfg.data.mix]
    assert files, f"{path.name} names no training data"
    for f in files:
        assert Path(f).is_file(), f"{path.name}: {f} (relative to the file) is missing"


def test_examples_exist():
    assert len(EXAMPLES) >= 3


def test_retrain_with_a_validation_file_is_refused_before_the_search():
    with pytest.raises(ConfigError, match="tune.retrain.*data.validation"):
        load_config(overrides=["tune.retrain=true", "data.validation=val.jsonl"])
