"""Every Hydra config composes; bad overrides fail before training; one fast_dev_run per experiment."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lightning_sgsc import SafetyGuidedQuantization
from lightning_sgsc.examples import FashionCNN
from lightning_sgsc.export import load_compressed
from lightning_sgsc.train import CONF_DIR, train
from tests.helpers.data import write_mnist_like, write_names

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in Path(CONF_DIR).iterdir() if g.is_dir()}


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_group_option_composes(group, option, tmp_path):
    cfg = _compose([f"{group}={option}", f"output_dir={tmp_path}"])
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_groups_are_all_there():
    assert {"model", "data", "sgsc", "preservation", "trainer", "experiment", "sweep"} <= set(GROUPS)
    assert {"digits", "fashion_mnist", "mnist10k", "names"} <= set(GROUPS["data"])
    assert {"digits_cnn", "fashion_cnn", "char_transformer"} <= set(GROUPS["model"])


def test_sweeps_are_multirun_over_the_documented_axes():
    cfg = _compose(["sweep=fashion_hparams", "output_dir=/tmp/x"])
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra_cfg = compose("train", overrides=["sweep=fashion_hparams"], return_hydra_config=True).hydra
    assert str(hydra_cfg.mode) in ("MULTIRUN", "RunMode.MULTIRUN")
    assert set(hydra_cfg.sweeper.params) == {"data.batch_size", "model.lr", "sgsc.init_bits"}
    assert hydra_cfg.sweeper.params["sgsc.init_bits"] == "2,4,8,16"
    assert "joblib" in hydra_cfg.launcher._target_.lower()
    assert cfg.trainer.max_steps == 500 and cfg.data.train_limit == 10_000  # the shorter budget


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("sgsc.init_bits=abc", r"could not be converted to Float"),
        ("sgsc.bogus=1", r"Key 'bogus' not in 'SGSCSchema'"),
        ("sgsc.feedback.prune=maybe", r"is not a valid bool"),
        ("model=resnet", r"Could not find 'model/resnet'"),
    ],
)
def test_bad_overrides_fail_before_training(override, match):
    with pytest.raises(ConfigCompositionException) as info:
        _compose([override])
    message = f"{info.value} {info.value.__cause__}"  # Hydra puts the reason in the cause
    assert re.search(match, message), message


def _fast(tmp_path, experiment, extra=()):
    cfg = _compose(
        [f"experiment={experiment}", f"output_dir={tmp_path / 'results'}", "trainer.fast_dev_run=true", *extra]
    )
    return train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "unsafe", "float", "budget"])
def test_fashion_cnn_experiment_runs(tmp_path, variant):
    root = write_mnist_like(tmp_path / "fashion")
    result = _fast(
        tmp_path,
        "fashion_cnn",
        [f"data.root={root}", f"sgsc={variant}", "sgsc.preservation.warmup_epochs=0", "sgsc.preservation_size=16"],
    )
    assert result["variant"] == {"default": "safe"}.get(variant, variant)
    assert result["file_bytes"] > 0 and 0.0 <= result["test_metric"] <= 1.0
    saved = json.loads((tmp_path / "results" / "result.json").read_text())
    if variant != "float":  # every feedback event, and the restores split by cause
        assert saved["feedback"] and {"restored", "kept_alive", "pruned", "metric"} <= set(saved["feedback"][0])
        assert saved["restored_channels"] == sum(e["restored"] for e in saved["feedback"])
        assert saved["kept_alive_channels"] == sum(e["kept_alive"] for e in saved["feedback"])
        artifact = tmp_path / "results" / saved["artifact"]  # the measured file is kept, and it reloads
        assert artifact.stat().st_size == saved["file_bytes"]
        net = load_compressed(artifact, FashionCNN())
        assert sum(p.numel() for p in net.parameters()) == 421_642


@pytest.mark.slow
def test_names_transformer_experiment_runs(tmp_path):
    path = write_names(tmp_path / "names.txt")
    result = _fast(
        tmp_path,
        "names_transformer",
        [
            f"data.path={path}",
            "sgsc.preservation.warmup_epochs=0",
            "sgsc.preservation_size=16",
            "sgsc.preservation.pool=64",
        ],
    )
    assert result["test_metric_name"] == "test/loss" and result["file_bytes"] < result["float32_bytes"]
    assert result["val_metric_name"] == "val/loss"  # the experiment's metric: a loss


@pytest.mark.slow
def test_mnist10k_and_digits_experiments_run(tmp_path):
    root = write_mnist_like(tmp_path / "mnist", n_test=300)
    assert _fast(tmp_path, "mnist10k", [f"data.root={root}", "sgsc.preservation.warmup_epochs=0"])["file_bytes"] > 0
    assert _fast(tmp_path, "digits", ["sgsc.preservation.warmup_epochs=0"])["test_metric_name"] == "test/acc"


def test_a_budgeted_run_fine_tunes_a_saved_float_run_and_takes_its_value_as_the_reference(tmp_path):
    import lightning.pytorch as pl
    import torch
    from hydra.utils import instantiate

    float_cfg = ["experiment=digits", "sgsc=float", "save_weights=true", "trainer.max_epochs=3"]
    float_run = train(_compose([*float_cfg, f"output_dir={tmp_path / 'results'}"]))  # trained: far from its init
    weights = tmp_path / "results" / float_run["weights"]
    overrides = ["sgsc=budget", "sgsc.budget.warmup_checks=0", f"init_from={weights}", "sgsc.max_drop=0.01"]
    result = _fast(tmp_path / "tune", "digits", overrides)
    cfg = _compose(["experiment=digits", *overrides])
    module = instantiate({k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "name"})
    module.load_state_dict(torch.load(weights, weights_only=True))
    trainer = pl.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    expected = trainer.validate(module, datamodule=instantiate(cfg.data), verbose=False)[0]["val/acc"]
    assert expected > 0.5  # trained, not chance: a run that ignored init_from would measure a random init's ~0.1
    assert result["init_from"] == str(weights)
    assert result["reference_value"] == pytest.approx(expected)  # the float model's own value, not a random init's
    assert result["budget"]["reference"] == pytest.approx(expected)


def test_init_from_also_takes_a_lightning_checkpoint(tmp_path):
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    cfg = _compose(["experiment=digits", "sgsc=float"])
    module = instantiate({k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "name"})
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    ckpt = tmp_path / "float.ckpt"
    trainer.save_checkpoint(ckpt)
    expected = trainer.validate(module, datamodule=instantiate(cfg.data), verbose=False)[0]["val/acc"]
    result = _fast(tmp_path, "digits", ["sgsc=budget", f"init_from={ckpt}", "sgsc.max_drop=0.01"])
    assert expected > 0.5 and result["reference_value"] == pytest.approx(expected)


def test_init_from_a_missing_or_foreign_file_is_refused(tmp_path):
    from lightning_sgsc import SGSCValueError

    with pytest.raises(SGSCValueError, match=r"`init_from` must be a weights file .* No such file"):
        _fast(tmp_path, "digits", [f"init_from={tmp_path / 'nope.pt'}"])
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SGSCValueError, match=r"`init_from` must be a weights file .*empty.pt'.* 0 bytes long"):
        _fast(tmp_path, "digits", [f"init_from={tmp_path / 'empty.pt'}"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all, just text")
    with pytest.raises(SGSCValueError, match=r"`init_from` must be a weights file .*junk.pt'.* could not read it"):
        _fast(tmp_path, "digits", [f"init_from={tmp_path / 'junk.pt'}"])
    from lightning_sgsc import export_compressed, quantize_
    from lightning_sgsc.examples import DigitsCNN

    net = DigitsCNN()
    quantize_(net)
    export_compressed(net, tmp_path / "net.sgsc")
    with pytest.raises(SGSCValueError, match=r"safetensors file \(a compressed .sgsc artifact\?\)"):
        _fast(tmp_path, "digits", [f"init_from={tmp_path / 'net.sgsc'}"])
    names = _fast(
        tmp_path,
        "names_transformer",
        ["sgsc=float", "save_weights=true", f"data.path={write_names(tmp_path / 'n.txt')}"],
    )
    with pytest.raises(SGSCValueError, match=r"`init_from` must be the weights of this model.*Missing"):
        _fast(tmp_path, "digits", [f"init_from={tmp_path / 'results' / names['weights']}"])


def test_the_digits_experiment_compresses_with_the_demo_settings():
    # The demo's settings were tuned with exponents fitted tightly (headroom 0); the default 2 bits cost it accuracy.
    from hydra.utils import instantiate

    from lightning_sgsc.demo import DEMO_SETTINGS

    cfg = OmegaConf.to_container(_compose(["experiment=digits"]).sgsc, resolve=True)
    cfg.pop("enabled"), cfg.pop("variant")
    assert DEMO_SETTINGS["quantization"]["init_headroom"] == 0
    assert instantiate(cfg).settings == SafetyGuidedQuantization(**DEMO_SETTINGS).settings


def test_help_lists_every_setting_with_its_help_from_the_settings_docstrings():
    import subprocess
    import sys

    from lightning_sgsc.config import SETTINGS, field_help

    run = subprocess.run([sys.executable, "-m", "lightning_sgsc.train", "--help"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    flat = " ".join(run.stdout.split())
    for group, cls in SETTINGS.items():
        for field, text in field_help(cls).items():
            if field not in ("data", "source", "output_fn"):
                assert f"sgsc.{group}.{field}=" in flat and " ".join(text.split()[:4]) in flat, (group, field)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sgsc.preservation.fractions={uncertainty:0.5,kmeans:0.5}", {"uncertainty": 0.5, "kmeans": 0.5}),
        ("sgsc.include=[net.conv1,net.fc]", ["net.conv1", "net.fc"]),
        ("sgsc.budget.max_drop=0.02", 0.02),
    ],
)
def test_dict_and_list_settings_override_from_the_command_line(override, expected):
    from hydra.utils import instantiate

    cfg = OmegaConf.to_container(_compose([override]).sgsc, resolve=True)
    cfg.pop("enabled"), cfg.pop("variant")
    settings = instantiate(cfg).settings
    group, field = {"include": ("quantization", "include")}.get(override.split("=")[0][5:], (None, None))
    key = override.split("=")[0].split(".")
    value = getattr(getattr(settings, key[1]), key[2]) if group is None else getattr(getattr(settings, group), field)
    assert (list(value) if isinstance(value, (list, tuple)) else value) == expected
    with pytest.raises(ConfigCompositionException):
        _compose(["sgsc.quantization.init_bits=[1,2]"])  # checked before training


def test_missing_fashion_files_are_named_with_the_hydra_spelling_of_the_fix(tmp_path):
    from lightning_sgsc.examples import IDXImageDataModule

    with pytest.raises(FileNotFoundError, match=r"in the Hydra app: data.download=true"):
        IDXImageDataModule(root=str(tmp_path / "none")).setup()
