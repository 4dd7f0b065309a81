"""Params that try to poison a run: non-finite floats, huge counts, splits that cannot be filled,
names that would leave data/, alias bombs, huge values in error messages, a diverging recipe.
Every one is an exit-2 error naming the key before any work starts (or, for a diverging
recipe, at the first bad epoch), bounded in time and in message size; never a traceback."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import RECIPE, REPO, cli_env, make_params, train_params, write_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifarflow import bounded_yaml
from cifarflow.bounded_yaml import MAX_YAML_NODES, read_yaml
from cifarflow.cli import main
from cifarflow.errors import ConfigError, InputError
from cifarflow.settings import resolve


def check(tmp_path: Path, raw: dict, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    path = write_params(tmp_path, raw)
    code = main(["--params", str(path), "params", "--check"])
    return code, capsys.readouterr().err


def with_key(dotted: str, value: object) -> dict:
    raw: dict = {"archs": ["x"], "train": {"x": copy.deepcopy(RECIPE)}}
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        node = node if isinstance(node, dict) else {}
    node[leaf] = value
    return raw


FLOATS = [
    "data.timeout_s",
    "data.deadline_s",
    "train.x.optimizer.learning_rate",
    "train.x.optimizer.momentum",
    "train.x.schedule.decay",
    "train.x.schedule.factor",
    "train.x.schedule.min_lr",
    "train.x.mixup.alpha",
    "export.min_accuracy",
    "export.tolerance",
    "export.significance",
]


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_every_float_is_finite(tmp_path: Path, capsys: pytest.CaptureFixture, key: str, value: float) -> None:
    code, err = check(tmp_path, with_key(key, value), capsys)
    assert code == 2 and key in err and ("finite" in err or "greater" in err or "less" in err), err


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.retries", 10**9),
        ("data.max_download_mb", 10**12),
        ("data.val_size", 10**12),
        ("data.shards", 10**6),
        ("data.max_members", -1),
        ("data.max_image_pixels", 10**15),
        ("train.x.epochs", 10**9),
        ("train.x.batch_size", 10**9),
        ("train.x.optimizer.learning_rate", 1e6),
        ("evaluate.batch_size", 0),
        ("runtime.logical_cpus", 10**6),
        ("seed", 2**40),
        ("train.x.schedule.boundaries", list(range(1000))),
    ],
)
def test_counts_and_sizes_are_bounded(tmp_path: Path, capsys: pytest.CaptureFixture, key: str, value: object) -> None:
    code, err = check(tmp_path, with_key(key, value), capsys)
    assert code == 2 and key in err, err


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"source": "synth:train=999999999,test=50"}, "less than or equal to 200000"),
        ({"source": "synth:train=100,test=50", "val_size": 100}, "set 0 < data.val_size < 100"),
        ({"source": "synth:train=100,test=12", "val_size": 20, "shards": 16}, "set data.shards <= 12"),
        ({"source": "synth:train=100,test=50", "val_size": 3, "shards": 4}, "set data.shards <= 3"),
    ],
)
def test_cross_field_rules_before_work(tmp_path: Path, capsys: pytest.CaptureFixture, data: dict, fragment: str) -> None:
    code, err = check(tmp_path, {"data": {"md5": None, **data}}, capsys)
    assert code == 2 and fragment in err, err


def test_archive_too_small_for_the_shards_is_refused_by_preprocess_before_writing(tmp_path: Path) -> None:
    from cifarflow.data import download, preprocess

    params = make_params(source="synth:train=100,test=20,seed=1", md5=None, val_size=10, shards=2)
    download.run(params, tmp_path / "raw", tmp_path / "cache")
    greedy = make_params(source=str(tmp_path / "any.tgz"), md5=None, allow_unverified=True, val_size=10, shards=50)
    with pytest.raises(InputError, match="data.shards is 50 but the smallest split has 10"):
        preprocess.run(greedy, tmp_path / "raw", tmp_path / "shards")
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("name", ["../../etc", "Lenet", "a/b", "x" * 65, "", "_hidden", "a b"])
def test_architecture_names_cannot_leave_data(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    code, err = check(tmp_path, {"archs": [name], "train": {name: RECIPE}}, capsys)
    assert code == 2 and "architecture name" in err, err


def test_error_messages_are_bounded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    huge = "x" * 200_000  # the file stays under the 1 MiB a params file may have
    code, err = check(
        tmp_path,
        {
            "data": {"md5": huge, "shards": ["y" * 1000] * 300, "val_size": {"a": huge}},
            "seed": huge,
            **{f"typo{i}": 1 for i in range(50)},
        },
        capsys,
    )
    assert code == 2 and len(err) < 4000, len(err)
    assert "more" in err  # the rest counted, not listed
    with pytest.raises(ConfigError) as caught:  # in memory, no file limit: a value of 10 MB
        resolve({"data": {"source": ["z" * 10_000_000]}, "archs": [["a"] * 100_000]})
    assert len(str(caught.value)) < 4000


def bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\narchs: [{', '.join([f'*a{levels - 1}'] * 10)}]\n"


def written_nodes(text: str) -> int:
    """How many nodes the text writes: scalars, collections and aliases, each once as written."""
    return sum(isinstance(e, bounded_yaml.NODE_EVENTS) for e in yaml.parse(text, Loader=yaml.SafeLoader))


def test_yaml_alias_bomb_is_rejected_in_work_linear_in_its_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4 KB "billion laughs" document: measured by visiting each composed node a bounded number of
    times (twice: on the way down and up, once per place the text names it), never by expanding it.
    An unmemoised measure visits ~10^9 nodes."""
    path = tmp_path / "params.yaml"
    path.write_text(bomb())
    assert len(path.read_bytes()) < 5000
    budget, visits = 2 * written_nodes(bomb()), []
    real = bounded_yaml._children

    def counted(node: yaml.Node) -> list[yaml.Node]:
        visits.append(1)
        if len(visits) > budget:
            raise AssertionError(f"over {budget} node visits for a text of {budget // 2} nodes: not linear")
        return real(node)

    monkeypatch.setattr(bounded_yaml, "_children", counted)
    with pytest.raises(ConfigError, match=f"more than {MAX_YAML_NODES:,} YAML nodes"):
        read_yaml(path)
    assert 0 < len(visits) <= budget
    monkeypatch.setattr(bounded_yaml, "_children", real)
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="recursive"):
        read_yaml(path)
    path.write_bytes(b"x: " + b"y" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        read_yaml(path)


def test_make_pipeline_checks_params_before_dvc_parses_them(tmp_path: Path) -> None:
    """DVC parses params.yaml itself (foreach: ${archs}) and would expand the bomb: `make pipeline`
    runs `cifarflow params --check` first, and stops there."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Makefile", "dvc.yaml", "pyproject.toml", "requirements.lock"):
        shutil.copy2(REPO / name, project / name)
    (project / "params.yaml").write_text(bomb())
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(
        ["make", "-C", str(project), f"VENV={venv}", "-o", f"{venv}/bin/.installed", "pipeline"],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert done.returncode != 0
    assert "YAML nodes" in done.stderr and "dvc repro" not in done.stdout.split("params --check")[-1], done.stdout


def test_flow_selection_refuses_the_bomb_before_touching_it(tmp_path: Path) -> None:
    from cifarflow.flows.pipeline import archs_for_this_run, workspace_for

    path = tmp_path / "params.yaml"
    path.write_text(bomb())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="YAML nodes"):
        workspace_for(tmp_path, "smoke")
    with pytest.raises(ConfigError, match="YAML nodes"), archs_for_this_run(tmp_path, ["lenet"]):
        pass
    assert path.read_bytes() == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    ),
    st.sampled_from(["data", "train", "export", "runtime", "evaluate", "archs", "profiles", "seed", "profile"]),
)
def test_any_value_anywhere_is_valid_or_a_config_error(value: object, section: str) -> None:
    try:
        resolve({section: value})
    except ConfigError as exc:
        assert len(str(exc)) < 6000


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=300))
def test_any_text_as_params_file_is_valid_or_a_config_error(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text)
        try:
            resolve(read_yaml(path) or {}, str(path))
        except ConfigError:
            pass


@pytest.mark.slow
def test_a_diverging_recipe_stops_with_exit_2_naming_it(tiny_shards: Path, tmp_path: Path) -> None:
    """Weights turned to NaN mid-epoch (as a too-high learning rate does): exit 2, no model kept."""
    params = train_params("lenet", epochs=2)
    path = write_params(tmp_path, yaml.safe_load(yaml.safe_dump(params.model_dump(mode="json"))))
    verdict = tmp_path / "verdict.json"
    assert (
        main(
            [
                "--params",
                str(path),
                "validate",
                "--shards",
                str(tiny_shards),
                "--metrics",
                str(tmp_path / "m.json"),
                "--report",
                str(tmp_path / "r.md"),
                "--verdict",
                str(verdict),
            ]
        )
        == 0
    )
    env = cli_env() | {"CIFARFLOW_FAULT_NAN_AT": "0:2", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifarflow",
            "--params",
            str(path),
            "train",
            "lenet",
            "--shards",
            str(tiny_shards),
            "--out",
            str(tmp_path / "out"),
            "--runinfo",
            str(tmp_path / "ri"),
            "--checkpoints",
            str(tmp_path / "ck"),
            "--verdict",
            str(verdict),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.lenet diverges" in done.stderr and "not finite in epoch 1" in done.stderr
    assert not (tmp_path / "out" / "model.keras").exists() and "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["../../escaped", "..", "x/y", "a b", "-x", "Smoke"])
def test_profile_names_cannot_leave_runs(tmp_path: Path, capsys: pytest.CaptureFixture, name: str) -> None:
    code, err = check(tmp_path, {"profiles": {name: {}}}, capsys)
    assert code == 2 and "profile name" in err, err


def test_deep_nesting_duplicate_keys_and_odd_yaml_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    for text, fragment in (
        ("x: " + "[" * 500 + "]" * 500 + "\n", "nested more than|recursion"),
        ("x: " + "{a: " * 300 + "1" + "}" * 300 + "\n", "nested more than|recursion"),
        ("seed: 1\nseed: 2\n", "appears twice"),
        ("seed: 2001-02-31\n", "not valid YAML"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=fragment):
            read_yaml(path)


@pytest.mark.parametrize(
    "source",
    [
        "HTTP://bob:hunter2@127.0.0.1:9/x.tgz",
        " https://bob:hunter2@h/x.tgz",
        "ftp://bob:hunter2@h/x.tgz",
        "s3://KEY:hunter2@bucket/x",
        "https:\\\\bob:hunter2@h/x",
        "http:/bob:hunter2@h/x.tgz",
        "Https://bob:hunter2@h/x",
    ],
)
def test_credentials_in_any_url_shape_are_refused_unechoed(tmp_path: Path, capsys: pytest.CaptureFixture, source: str) -> None:
    code, err = check(tmp_path, {"data": {"source": [source], "md5": None, "allow_unverified": True}}, capsys)
    assert code == 2 and "hunter2" not in err, err


def test_missing_keys_that_dvc_reads_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["archs"]  # the one key the project's dvc.yaml reads itself: its foreach
    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    code, err = check(tmp_path, raw, capsys)
    assert code == 2 and "archs: dvc.yaml's stage train reads this key" in err, err


def test_flow_selection_is_validated_before_it_is_written(tmp_path: Path) -> None:
    from cifarflow.flows.pipeline import archs_for_this_run, workspace_for

    path = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", path)
    path.chmod(0o644)
    before = path.read_bytes()
    for archs in (["nosucharch"], ["../x"]):
        with pytest.raises(ConfigError), archs_for_this_run(tmp_path, archs):
            pass
        assert path.read_bytes() == before
    with pytest.raises(ConfigError, match="unknown profile 'smok'; valid: full, smoke"):
        workspace_for(tmp_path, "smok")
    assert workspace_for(tmp_path, "smoke") == tmp_path / "runs" / "smoke" and workspace_for(tmp_path, "full") == tmp_path
    with archs_for_this_run(tmp_path, ["lenet"]):
        assert path.stat().st_mode & 0o777 == 0o644  # an atomic rewrite keeps the file's mode
    assert path.read_bytes() == before
