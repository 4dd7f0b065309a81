"""Strict params: unknown keys, bad types and ranges are exit-2 errors that say what to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RECIPE, REPO, cli_env, write_params

from cifarflow.cli import main
from cifarflow.errors import ConfigError
from cifarflow.settings import load_params, resolve


def check(tmp_path: Path, raw: dict, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    path = write_params(tmp_path, raw)
    code = main(["--params", str(path), "params", "--check"])
    return code, capsys.readouterr().err


def test_committed_params_are_valid_in_every_profile() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.seed >= 0
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for profile in ["full", *raw["profiles"]]:
        assert resolve({**raw, "profile": profile}).profile == profile


def test_unknown_key_names_key_and_closest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = check(tmp_path, {"data": {"val_szie": 10}}, capsys)
    assert code == 2
    assert "unknown key 'data.val_szie'" in err and "did you mean val_size" in err


def test_unknown_key_in_overlay_is_caught_even_when_not_selected(tmp_path: Path, capsys) -> None:
    raw = {"profile": "full", "profiles": {"smoke": {"data": {"source": "synth:train=20,test=20", "md5": None, "shardz": 2}}}}
    code, err = check(tmp_path, raw, capsys)
    assert code == 2 and "profiles.smoke.data.shardz" in err and "shards" in err


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"val_size": "many"}, "data.val_size: Input should be a valid integer"),
        ({"val_size": 0}, "data.val_size: Input should be greater than or equal to 1"),
        ({"shards": 1.5}, "data.shards"),
        ({"md5": "xyz"}, "not a lowercase hex md5"),
        ({"source": []}, "give at least one source"),
        ({"source": "synth:train=100,test=50"}, "set data.md5 to null"),
        ({"source": "synth:train=100,tset=50", "md5": None}, "unknown synth key 'tset'"),
        ({"source": "https://example.invalid/a.tgz", "md5": None}, "no checksum for the archive source"),
    ],
)
def test_bad_values_are_errors(tmp_path: Path, capsys, data: dict, fragment: str) -> None:
    code, err = check(tmp_path, {"data": data}, capsys)
    assert code == 2
    assert fragment in err


def test_unknown_profile(tmp_path: Path, capsys) -> None:
    code, err = check(tmp_path, {"profile": "smok"}, capsys)
    assert code == 2 and "unknown profile 'smok'" in err


def test_profile_overlay_applies(tmp_path: Path) -> None:
    raw = {
        "profile": "smoke",
        "data": {"val_size": 7},
        "profiles": {"smoke": {"data": {"source": "synth:train=20,test=20", "md5": None, "shards": 3}}},
    }
    params = resolve(raw)
    assert params.profile == "smoke" and params.data.shards == 3 and params.data.val_size == 7
    with pytest.raises(ConfigError):
        resolve({**raw, "profiles": {"smoke": {"profile": "full"}}})


def test_params_are_frozen() -> None:
    params = resolve({})
    with pytest.raises(Exception, match="frozen"):
        params.data.val_size = 3  # type: ignore[misc]


def test_check_is_fast_and_does_not_import_tensorflow(tmp_path: Path) -> None:
    code = (
        "import sys; from cifarflow.cli import main; rc = main(['--params', sys.argv[1], 'params', '--check']);"
        "assert 'tensorflow' not in sys.modules; assert 'pyarrow' not in sys.modules; sys.exit(rc)"
    )
    path = write_params(tmp_path, {"data": {"val_size": 10}})
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=cli_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = write_params(tmp_path, {"data": {"val_size": -1}})
    done = subprocess.run(
        [sys.executable, "-m", "cifarflow", "--params", str(bad), "params", "--check"],
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "data.val_size" in done.stderr


def test_params_prints_resolved_config(tmp_path: Path, capsys) -> None:
    path = write_params(
        tmp_path,
        {
            "profile": "smoke",
            "profiles": {"smoke": {"data": {"source": "synth:train=20,test=20", "md5": None, "val_size": 5, "shards": 2}}},
        },
    )
    assert main(["--params", str(path), "params"]) == 0
    out = capsys.readouterr().out
    assert "profile: smoke" in out and "synth:train=20,test=20" in out


MINMAX_RECIPE = {**RECIPE, "normalization": "minmax"}


@pytest.mark.parametrize(
    ("recipe", "fragment"),
    [
        (
            {"model": "vgg"},
            "train.a.model: Input should be 'simple_cnn', 'lenet', 'resnet56', 'densenet121' or 'whitened_vgg' (got 'vgg')",
        ),
        ({"variant": "huge"}, "train.a.variant: Input should be 'full' or 'tiny' (got 'huge')"),
        ({"normalization": "zscore"}, "train.a.normalization: Input should be 'center', 'minmax' or 'standardize'"),
        ({"model": "densenet121", "stem": "resnet"}, "train.a.stem: Input should be 'imagenet' or 'cifar'"),
        ({"model": "densenet121"}, "densenet121 needs stem: imagenet (the seed) or cifar"),
        ({"stem": "cifar"}, "stem applies to densenet121 only"),
    ],
)
def test_model_names_come_from_the_catalog(tmp_path: Path, capsys, recipe: dict, fragment: str) -> None:
    """A bad family, variant, normalization or stem names the key and lists the catalog's valid values."""
    code, err = check(tmp_path, {"train": {"a": {**MINMAX_RECIPE, **recipe}}}, capsys)
    assert code == 2 and fragment in err, err
