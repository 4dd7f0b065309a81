"""Unit tests of cifarflow.config: in-process, no TensorFlow, milliseconds each.

The pydantic field bounds and validators yield no mutants (mutmut 3 skips decorated functions and
class-level Field(...) calls), so they are covered here by property-based tests that derive every
numeric bound from the models themselves and check both sides of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from conftest import RECIPE
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from cifarflow import settings as c
from cifarflow.bounded_yaml import MAX_PARAMS_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, expanded_size, read_yaml
from cifarflow.champion import check_champion_dir
from cifarflow.dvcfile import dvc_outputs, missing_dvc_params
from cifarflow.errors import ConfigError
from cifarflow.settings import (
    MAX_LINE,
    DataParams,
    Params,
    ScheduleParams,
    check_split_sizes,
    deep_merge,
    load_params,
    resolve,
    short_line,
)
from cifarflow.sources import MAX_EXAMPLES, SynthSpec, check_checksum_keys, checksum_keys_set, source_kind

SYNTH = {"source": "synth:train=100,test=50", "md5": None, "val_size": 10, "shards": 2}


def node(text: str) -> yaml.Node:
    return yaml.compose(text, Loader=yaml.SafeLoader)


# --- every numeric bound, as documented, both sides ----------------------------------------------

# (model, field, op, limit): the documented range of every numeric setting, written out here, not
# read from the models, so that a loosened or tightened bound in cifarflow.settings fails below.
SPEC: list[tuple[str, str, str, float]] = [
    ("DataParams", "retries", "ge", 0),
    ("DataParams", "retries", "le", 100),
    ("DataParams", "timeout_s", "gt", 0),
    ("DataParams", "timeout_s", "le", 3600),
    ("DataParams", "deadline_s", "gt", 0),
    ("DataParams", "deadline_s", "le", 86400),
    ("DataParams", "max_download_mb", "ge", 1),
    ("DataParams", "max_download_mb", "le", 1 << 20),
    ("DataParams", "max_member_mb", "ge", 1),
    ("DataParams", "max_member_mb", "le", 1 << 20),
    ("DataParams", "max_extract_mb", "ge", 1),
    ("DataParams", "max_extract_mb", "le", 1 << 20),
    ("DataParams", "max_members", "ge", 1),
    ("DataParams", "max_members", "le", 10_000_000),
    ("DataParams", "max_image_pixels", "ge", 32 * 32),
    ("DataParams", "max_image_pixels", "le", 1 << 31),
    ("DataParams", "max_image_chunks", "ge", 3),
    ("DataParams", "max_image_chunks", "le", 10_000_000),
    ("DataParams", "val_size", "ge", 1),
    ("DataParams", "val_size", "le", 10_000_000),
    ("DataParams", "shards", "ge", 1),
    ("DataParams", "shards", "le", 4096),
    ("OptimizerParams", "learning_rate", "gt", 0),
    ("OptimizerParams", "learning_rate", "le", 10),
    ("OptimizerParams", "lr_reference_batch", "ge", 1),
    ("OptimizerParams", "lr_reference_batch", "le", 65536),
    ("OptimizerParams", "momentum", "ge", 0),
    ("OptimizerParams", "momentum", "lt", 1),
    ("OptimizerParams", "norm_bias_rate", "gt", 0),
    ("OptimizerParams", "norm_bias_rate", "le", 1000),
    ("ScheduleParams", "decay", "gt", 0),
    ("ScheduleParams", "decay", "le", 1),
    ("ScheduleParams", "factor", "gt", 0),
    ("ScheduleParams", "factor", "lt", 1),
    ("ScheduleParams", "patience", "ge", 0),
    ("ScheduleParams", "patience", "le", 10_000),
    ("ScheduleParams", "min_lr", "ge", 0),
    ("ScheduleParams", "min_lr", "le", 10),
    ("ScheduleParams", "warmup", "ge", 0),
    ("ScheduleParams", "warmup", "lt", 1),
    ("ScheduleParams", "start", "ge", 0),
    ("ScheduleParams", "start", "le", 1),
    ("ScheduleParams", "end", "ge", 0),
    ("ScheduleParams", "end", "le", 1),
    ("MixupParams", "alpha", "gt", 0),
    ("MixupParams", "alpha", "le", 1000),
    ("MixupParams", "warmup", "ge", 0),
    ("MixupParams", "warmup", "le", 10_000),
    ("EmaParams", "momentum", "ge", 0),
    ("EmaParams", "momentum", "lt", 1),
    ("EmaParams", "every", "ge", 1),
    ("EmaParams", "every", "le", 100_000),
    ("EmaParams", "ramp", "ge", 0),
    ("EmaParams", "ramp", "le", 100),
    ("Recipe", "epochs", "ge", 1),
    ("Recipe", "epochs", "le", 10_000),
    ("Recipe", "batch_size", "ge", 1),
    ("Recipe", "batch_size", "le", 65536),
    ("Recipe", "width", "ge", 1),
    ("Recipe", "width", "le", 1024),
    ("Recipe", "label_smoothing", "ge", 0),
    ("Recipe", "label_smoothing", "lt", 1),
    ("Recipe", "validate_every", "ge", 1),
    ("Recipe", "validate_every", "le", 10_000),
    ("Recipe", "gpus", "ge", 0),
    ("Recipe", "gpus", "le", 64),
    ("ClusterParams", "pickup_timeout_s", "gt", 0),
    ("ClusterParams", "pickup_timeout_s", "le", 7 * 86_400),
    ("ClusterParams", "lost_after_s", "ge", 10),
    ("ClusterParams", "lost_after_s", "le", 86_400),
    ("ClusterParams", "attempts", "ge", 1),
    ("ClusterParams", "attempts", "le", 100),
    ("ClusterParams", "poll_s", "ge", 0.1),
    ("ClusterParams", "poll_s", "le", 60),
    ("RuntimeParams", "logical_cpus", "ge", 0),
    ("RuntimeParams", "logical_cpus", "le", 64),
    ("RuntimeParams", "oom_min_micro_batch", "ge", 1),
    ("RuntimeParams", "oom_min_micro_batch", "le", 65536),
    ("RuntimeParams", "threads", "ge", 0),
    ("RuntimeParams", "threads", "le", 256),
    ("EvaluateParams", "batch_size", "ge", 1),
    ("EvaluateParams", "batch_size", "le", 65536),
    ("RobustnessParams", "images", "ge", 10),
    ("RobustnessParams", "images", "le", 200_000),
    ("ExportParams", "min_accuracy", "ge", 0),
    ("ExportParams", "min_accuracy", "le", 1),
    ("ExportParams", "tolerance", "ge", 0),
    ("ExportParams", "tolerance", "le", 1),
    ("ExportParams", "significance", "gt", 0),
    ("ExportParams", "significance", "lt", 1),
    ("ExportParams", "min_corruption_accuracy", "ge", 0),
    ("ExportParams", "min_corruption_accuracy", "le", 1),
    ("Params", "seed", "ge", 0),
    ("Params", "seed", "le", 2**31 - 1),
    ("SynthSpec", "train", "ge", 10),
    ("SynthSpec", "train", "le", 200_000),
    ("SynthSpec", "test", "ge", 10),
    ("SynthSpec", "test", "le", 200_000),
    ("SynthSpec", "seed", "ge", 0),
    ("SynthSpec", "seed", "le", 2**32 - 1),
    ("SynthSpec", "mislabel", "ge", 0),
    ("SynthSpec", "mislabel", "le", 90),
]
# Every params model the settings module defines (and the synth spec): derived, so a new model's
# bounds are found without a list to keep up.
MODELS: dict[str, type[BaseModel]] = {
    name: obj
    for name, obj in {**vars(c), "SynthSpec": SynthSpec}.items()
    if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ in (c.__name__, SynthSpec.__module__)
}
REQUIRED: dict[str, dict[str, Any]] = {
    "OptimizerParams": {"name": "adam", "learning_rate": 0.01},
    "SynthSpec": {"train": 100, "test": 100},
    "DataParams": {"source": "https://example.org/a.tgz", "allow_unverified": True, "md5": None},
    "Recipe": {**RECIPE, "model": "whitened_vgg", "optimizer": {"name": "sgd", "learning_rate": 0.1}},
}


def declared_bounds() -> set[tuple[str, str, str]]:
    """(model, field, op) of every ge/gt/le/lt the models declare on a scalar field: what SPEC must cover."""
    found = set()
    for name, model in MODELS.items():
        for field_name, field in model.model_fields.items():
            for meta in field.metadata:
                for kind, attr in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt")):
                    if isinstance(meta, kind):
                        found.add((name, field_name, attr))
    return found


def test_the_spec_names_every_bound_the_models_declare() -> None:
    assert {(m, f, op) for m, f, op, _ in SPEC} == declared_bounds()


def accepted(model: str, field: str, value: float) -> bool:
    try:
        MODELS[model](**{**REQUIRED.get(model, {}), field: value})
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(("model", "field", "op", "limit"), SPEC, ids=[f"{m}.{f}.{op}" for m, f, op, _ in SPEC])
def test_every_numeric_setting_accepts_exactly_its_documented_range(model: str, field: str, op: str, limit: float) -> None:
    annotation = MODELS[model].model_fields[field].annotation
    step = 1 if annotation in (int, int | None) else 1e-6 * max(1.0, abs(limit))
    edge = limit if op in ("ge", "le") else (limit + step if op == "gt" else limit - step)
    beyond = limit - step if op in ("ge", "gt") else limit + step
    assert accepted(model, field, edge), f"{model}.{field} = {edge} refused; documented {op} {limit}"
    assert not accepted(model, field, beyond), f"{model}.{field} = {beyond} accepted; documented {op} {limit}"


@given(st.lists(st.integers(0, 50), max_size=6), st.lists(st.floats(0.01, 10), max_size=6))
def test_schedule_steps_need_increasing_boundaries_one_multiplier_each(boundaries: list[int], multipliers: list[float]) -> None:
    ok = len(boundaries) == len(multipliers) and boundaries == sorted(set(boundaries))
    try:
        ScheduleParams(kind="step", boundaries=boundaries, multipliers=multipliers)
        assert ok
    except ValidationError as exc:
        assert not ok
        assert "one entry each" in str(exc) if len(boundaries) != len(multipliers) else "increasing" in str(exc)


@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 2**33))
def test_synth_spec_parses_what_it_prints_within_its_bounds(train: int, test: int, seed: int) -> None:
    text = f"synth:train={train},test={test},seed={seed}"
    valid = 10 <= train <= MAX_EXAMPLES and 10 <= test <= MAX_EXAMPLES and seed <= 2**32 - 1
    try:
        spec = SynthSpec.parse(text)
    except ValueError as exc:
        assert not valid
        assert "synth " in str(exc) and "synth:train=2000,test=500,seed=0" in str(exc)
        return
    assert valid and str(spec) == text and (spec.train, spec.test, spec.seed) == (train, test, seed)


@given(st.text(alphabet="0123456789abcdefABCDEFxg ", max_size=70), st.sampled_from(["md5", "sha256"]))
def test_digests_are_lowercase_hex_of_the_algorithms_length(value: str, key: str) -> None:
    width = 32 if key == "md5" else 64
    valid = len(value) == width and all(ch in "0123456789abcdef" for ch in value)
    try:
        DataParams(source="https://example.org/a.tgz", **{"md5": None, "sha256": None, key: value})
        assert valid
    except ValidationError as exc:
        assert not valid and f"not a lowercase hex {key} digest" in str(exc)


@given(st.sampled_from(["lenet", "simple_cnn", "resnet56", "densenet121"]), st.sampled_from([None, "imagenet", "cifar", "other"]))
def test_stem_is_required_by_densenet_only_and_must_be_one_of_its_stems(model: str, stem: str | None) -> None:
    recipe = {**RECIPE, "model": model, **({"stem": stem} if stem else {})}
    ok = (model == "densenet121" and stem in ("imagenet", "cifar")) or (model != "densenet121" and stem is None)
    try:
        c.Recipe(**recipe)
        assert ok
    except ValidationError:
        assert not ok


@given(st.text(alphabet="abz09_A-/. ", min_size=0, max_size=66))
def test_arch_names_are_lowercase_identifiers_of_at_most_64(name: str) -> None:
    ok = bool(name) and len(name) <= 64 and name[0] in "abz09" and all(ch in "abz09_" for ch in name)
    try:
        resolve({"archs": [name], "train": {name: RECIPE}})
        assert ok
    except ConfigError as exc:
        assert not ok and "architecture name" in str(exc)


@given(st.sampled_from(["http", "https", "file", "ftp", "HTTP", "s3", "gs"]), st.sampled_from(["://", ":/", ":"]))
def test_url_shaped_sources_must_be_lowercase_http_https_or_file(scheme: str, sep: str) -> None:
    source = f"{scheme}{sep}host/a.tgz"
    ok = scheme in ("http", "https", "file") and sep == "://"
    try:
        DataParams(source=source, allow_unverified=True, md5=None)
        assert ok
    except ValidationError as exc:
        assert not ok and "host/a.tgz" not in exc.errors()[0]["msg"]  # never echoed: it may carry credentials


# --- plain functions ----------------------------------------------------------------------------


def test_synth_spec_rejects_malformed_parts_and_unknown_keys() -> None:
    assert SynthSpec.parse("synth:train=20, test = 30 ,,") == SynthSpec(train=20, test=30)
    for bad in ["synth:train", "synth:train=", "synth:train=x", "synth:train=-5", "synth:train=1234567890123"]:
        with pytest.raises(ValueError, match="bad synth source part .*expected key=integer"):
            SynthSpec.parse(bad)
    with pytest.raises(ValueError, match="unknown synth key 'size'; valid: train, test, seed"):
        SynthSpec.parse("synth:size=3")
    with pytest.raises(ValueError, match=r"synth train=5: Input should be greater than or equal to 10"):
        SynthSpec.parse("synth:train=5,test=10")


def test_split_sizes_need_train_left_and_every_split_to_fill_the_shards() -> None:
    check_split_sizes(100, 50, 1, 1)
    check_split_sizes(100, 50, 99, 1)
    check_split_sizes(100, 20, 20, 20)  # shards == the smallest split: one example each
    for val in (0, 100, 101):
        with pytest.raises(
            ValueError, match=f"data.val_size is {val} but the source has 100 train examples; set 0 < data.val_size < 100"
        ):
            check_split_sizes(100, 50, val, 1)
    with pytest.raises(
        ValueError,
        match=r"data.shards is 21 but the smallest split has 20 examples \(train 80, val 20, test 50\); set data.shards <= 20",
    ):
        check_split_sizes(100, 50, 20, 21)
    with pytest.raises(ValueError, match=r"smallest split has 9 examples \(train 9, val 91, test 50\)"):
        check_split_sizes(100, 50, 91, 10)
    with pytest.raises(ValueError, match=r"smallest split has 7 examples \(train 80, val 20, test 7\)"):
        check_split_sizes(100, 7, 20, 8)


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("synth:train=10", "synth"),
        ("http://h/a", "url"),
        ("https://h/a", "url"),
        ("file:///a", "url"),
        ("ftp://h/a", "local"),
        ("httpx://h", "local"),
        ("data/a.tgz", "local"),
        ("xhttp://h", "local"),
        ("synth", "local"),
    ],
)
def test_source_kind_by_syntax(source: str, kind: str) -> None:
    assert source_kind(source) == kind


def test_checksums_must_fit_the_kind_of_source() -> None:
    both = DataParams(source="https://h/a.tgz", md5="0" * 32, sha256="1" * 64)
    assert checksum_keys_set(both) == ["data.md5", "data.sha256"]
    assert checksum_keys_set(DataParams(source="https://h/a.tgz", md5=None, sha256="1" * 64)) == ["data.sha256"]
    with pytest.raises(
        ValueError, match=r"checksums do not apply to a generated source \(synth:x\); set data.md5 and data.sha256 to null"
    ):
        check_checksum_keys(both, "synth", "synth:x")
    with pytest.raises(ValueError, match=r"checksums do not apply to an image-folder source \(d\); set data.md5 and"):
        check_checksum_keys(both, "image-folder", "d")
    check_checksum_keys(both, "url", "https://h/a.tgz")
    check_checksum_keys(both, "archive", "a.tgz")
    none = DataParams(source="synth:train=100,test=50", md5=None, val_size=10, shards=2)
    check_checksum_keys(none, "synth", "s")
    check_checksum_keys(none, "image-folder", "d")
    check_checksum_keys(none, "local", "d")
    for kind in ("url", "archive"):
        with pytest.raises(
            ValueError,
            match=r"no checksum for the archive source a.tgz: set data.md5 or data.sha256, or set data.allow_unverified: true",
        ):
            check_checksum_keys(none, kind, "a.tgz")
    check_checksum_keys(none.model_copy(update={"allow_unverified": True}), "url", "a.tgz")


def test_deep_merge_merges_mappings_replaces_the_rest_and_copies() -> None:
    base = {"a": {"x": 1, "y": [1]}, "b": 2, "c": {"k": 1}}
    overlay = {"a": {"y": [2], "z": {"n": 1}}, "c": 5, "d": {"e": 1}}
    merged = deep_merge(base, overlay)
    assert merged == {"a": {"x": 1, "y": [2], "z": {"n": 1}}, "b": 2, "c": 5, "d": {"e": 1}}
    merged["a"]["x"] = 99
    merged["d"]["e"] = 99
    assert base["a"]["x"] == 1 and overlay["d"]["e"] == 1
    assert deep_merge({"a": 1}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_short_line_keeps_600_characters_and_counts_the_rest() -> None:
    assert short_line("x" * MAX_LINE) == "x" * MAX_LINE
    assert short_line("x" * 1601) == "x" * MAX_LINE + "… (1,601 characters)"


def test_resolve_names_the_profile_key_and_value_of_an_error() -> None:
    raw = {"data": SYNTH, "profiles": {"smoke": {"data": {"retries": 1000}}}}
    with pytest.raises(
        ConfigError,
        match=r"^invalid configuration\n  params.yaml: profiles.smoke.data.retries: "
        r"Input should be less than or equal to 100 \(got 1000\)$",
    ):
        resolve(raw)
    with pytest.raises(ConfigError, match=r"x.yaml: data.retries: Input should be less than or equal to 100 \(got 1000\)$"):
        resolve({"data": {**SYNTH, "retries": 1000}}, "x.yaml")
    with pytest.raises(ConfigError, match=r"data.source: .*bad synth source part") as info:
        resolve({"data": {**SYNTH, "source": "synth:train=zz"}})
    assert "got" not in str(info.value)  # a source is never echoed
    with pytest.raises(ConfigError, match=r"data.source.0: ") as info:  # nor an item of a mirror list
        resolve({"data": {**SYNTH, "source": [5, "synth:train=10,test=10"]}})
    assert "got" not in str(info.value) and "5" not in str(info.value).split("data.source.0: ")[1]
    with pytest.raises(ConfigError, match=r"train.x.epochs: Field required$"):
        resolve({"archs": ["x"], "train": {"x": {k: v for k, v in RECIPE.items() if k != "epochs"}}})
    with pytest.raises(ConfigError, match=r": \(top level\): "):
        resolve({"archs": ["x"]})


def test_unknown_keys_list_the_valid_keys_of_their_section_with_a_hint() -> None:
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'data.retires'; did you mean retries or timeout_s\? "
        r"Valid keys here: source, md5, sha256, allow_unverified, retries,",
    ):
        resolve({"data": {**SYNTH, "retires": 1}})
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'train.x.optimizer.nme'; did you mean name\? Valid "
        r"keys here: name, learning_rate, lr_reference_batch, momentum, nesterov, norm_bias_rate$",
    ):
        resolve({"archs": ["x"], "train": {"x": {**RECIPE, "optimizer": {"name": "adam", "learning_rate": 0.1, "nme": 1}}}})
    with pytest.raises(
        ConfigError, match=r"unknown key 'train.x.mixup.alfa'; did you mean alpha\? Valid keys here: alpha, warmup$"
    ):
        resolve({"archs": ["x"], "train": {"x": {**RECIPE, "mixup": {"alfa": 1}}}})
    with pytest.raises(ConfigError, match=r"unknown key 'zzzzzz' Valid keys here: profile, seed, data"):
        resolve({"zzzzzz": 1})


def test_errors_beyond_ten_are_counted() -> None:
    raw = {"data": {**SYNTH, **{f"k{i}": 1 for i in range(13)}}}
    with pytest.raises(ConfigError) as info:
        resolve(raw)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration" and len(lines) == 12 and lines[-1] == "  ... and 3 more"
    raw = {"data": {**SYNTH, **{f"k{i}": 1 for i in range(10)}}}
    with pytest.raises(ConfigError) as info:
        resolve(raw)
    assert len(str(info.value).splitlines()) == 11 and "more" not in str(info.value)


def test_resolve_checks_shape_profiles_and_selection() -> None:
    with pytest.raises(ConfigError, match=r"^p.yaml: expected a mapping of sections at top level, got list$"):
        resolve([], "p.yaml")  # type: ignore[arg-type]
    for profiles in ([1], {"a": 1}):
        with pytest.raises(ConfigError, match=r"profiles: expected a mapping of profile name -> overlay mapping"):
            resolve({"profiles": profiles})
    with pytest.raises(ConfigError, match=r"profile name 'Bad' is not lowercase"):
        resolve({"profiles": {"ok": {}, "Bad": {}}})
    with pytest.raises(ConfigError, match=r"profile: unknown profile 'nope'; valid: 'full, smoke'$"):
        resolve({"profile": "nope", "profiles": {"smoke": {}}})
    for key, why in (
        ("profile", "an overlay cannot select a profile"),
        ("profiles", "overlays do not nest"),
        ("archs", "DVC's foreach reads the top-level archs whatever the profile"),
    ):
        with pytest.raises(ConfigError, match=rf"profiles.smoke.{key}: {why}"):
            resolve({"profiles": {"smoke": {key: "x"}}})
    with pytest.raises(ConfigError, match=r"profiles: 17 overlays; at most 16"):
        resolve({"profiles": {f"p{i}": {} for i in range(17)}})
    raw = {"profile": "smoke", "seed": 1, "profiles": {"smoke": {"seed": 2}, "other": {"seed": 3}}}
    assert resolve(raw).seed == 2 and resolve(raw).profile == "smoke"
    assert resolve({**raw, "profile": "full"}).seed == 1 and resolve({**raw, "profile": "full"}).profile == "full"
    assert resolve({"profiles": None}).profile == "full"
    with pytest.raises(ConfigError, match=r"profiles.other.seed"):
        resolve({**raw, "profiles": {"smoke": {}, "other": {"seed": -1}}})


def test_recipe_lookup_suggests_the_closest_arch() -> None:
    params = resolve({"archs": ["lenet"], "train": {"lenet": RECIPE, "resnet": RECIPE}})
    assert params.recipe("lenet").model == "lenet"
    with pytest.raises(
        ConfigError, match=r"unknown arch 'lenett': did you mean lenet\? valid: lenet, resnet \(the keys of train:\)"
    ):
        params.recipe("lenett")
    with pytest.raises(ConfigError, match=r"unknown arch 'zzz': valid: lenet, resnet"):
        params.recipe("zzz")
    for archs, msg in (
        (["nope"], r"archs \['nope'\] have no recipe under train:; recipes: lenet, resnet"),
        (["lenet", "lenet"], "lists an architecture twice"),
    ):
        with pytest.raises(ConfigError, match=msg):
            resolve({"archs": archs, "train": {"lenet": RECIPE, "resnet": RECIPE}})
    assert yaml.safe_load(params.to_yaml())["archs"] == ["lenet"]


def test_expanded_size_counts_every_node_after_aliases() -> None:
    assert expanded_size(node("a: [1, 2]"), "p") == 5  # mapping, key, sequence, two items
    assert expanded_size(node("1"), "p") == 1
    assert expanded_size(node("a: &x [1, 2]\nb: *x\nc: *x"), "p") == 1 + 3 * 4
    bomb = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(5)
    )
    assert expanded_size(node(bomb), "p") == MAX_YAML_NODES + 1  # capped, not computed to a million
    with pytest.raises(
        ConfigError, match=r"^p: line 2: key 'a' appears twice in one mapping \(DVC refuses such a file\); keep one$"
    ):
        expanded_size(node("a: 1\na: 2"), "p")
    deep_ok = "[" * MAX_YAML_DEPTH + "]" * MAX_YAML_DEPTH
    assert expanded_size(node(deep_ok), "p") == MAX_YAML_DEPTH
    with pytest.raises(ConfigError, match=rf"^p: line 1: nested more than {MAX_YAML_DEPTH} levels deep"):
        expanded_size(node("[" * (MAX_YAML_DEPTH + 2) + "]" * (MAX_YAML_DEPTH + 2)), "p")
    loop = node("a: &x [1]")
    seq = loop.value[0][1]
    seq.value.append(seq)
    with pytest.raises(ConfigError, match="a YAML alias refers to a node that contains it"):
        expanded_size(loop, "p")


def test_read_yaml_bounds_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    with pytest.raises(ConfigError, match=r"p.yaml: not found; run from the project root or pass --params"):
        read_yaml(path)
    with pytest.raises(ConfigError, match=r"is a folder, not a regular file; expected a YAML file"):
        read_yaml(tmp_path)
    path.write_text("")
    assert read_yaml(path) == {}
    path.write_text("a: 1\nb: [x]\n")
    assert read_yaml(path) == {"a": 1, "b": ["x"]}
    path.write_text("#" * MAX_PARAMS_BYTES)
    assert read_yaml(path) == {}
    path.write_text("#" * (MAX_PARAMS_BYTES + 1))
    with pytest.raises(ConfigError, match=r"larger than 1,048,576 bytes; not a YAML file"):
        read_yaml(path)
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as f:
        f.truncate(64 << 30)  # 64 GiB, sparse: read only up to the bound, never whole
    with pytest.raises(ConfigError, match=r"huge.yaml: larger than"):
        read_yaml(huge)
    path.write_bytes(b"a: \xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_yaml(path)
    path.write_text("a: [1")
    with pytest.raises(ConfigError, match=r"p.yaml: not valid YAML: "):
        read_yaml(path)
    path.write_text("a: 2024-99-99\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        read_yaml(path)
    path.write_text("a: &a [" + ",".join(["1"] * 400) + "]\nb: [" + ",".join(["*a"] * 300) + "]\n")
    with pytest.raises(ConfigError, match=rf"expands to more than {MAX_YAML_NODES:,} YAML nodes"):
        read_yaml(path)


def project(tmp_path: Path, params: dict[str, Any], dvc: dict[str, Any] | None = None) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    if dvc is not None:
        (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    return tmp_path / "params.yaml"


def test_load_params_checks_the_champion_dir_of_every_profile(tmp_path: Path) -> None:
    base = {"data": SYNTH}
    assert load_params(project(tmp_path, base)).export.champion_dir == "champion"
    with pytest.raises(
        ConfigError,
        match=r"params.yaml: export.champion_dir: 'data' \(.*/data\) lies inside data/ \(DVC's outputs\); `dvc repro`",
    ):
        load_params(project(tmp_path, {**base, "export": {"champion_dir": "data"}}))
    assert (
        load_params(project(tmp_path, {**base, "export": {"champion_dir": "data"}}), check_paths=False).export.champion_dir
        == "data"
    )
    raw = {**base, "profiles": {"smoke": {"export": {"champion_dir": ".git/x"}}}}
    with pytest.raises(ConfigError, match=r"params.yaml: profiles.smoke.export.champion_dir: '.git/x' \(.*\) lies inside .git;"):
        load_params(project(tmp_path, raw))
    raw = {**base, "export": {"champion_dir": ".dvc"}, "profiles": {"smoke": {"seed": 3}}}
    with pytest.raises(ConfigError, match=r"params.yaml: export.champion_dir: '.dvc' \(.*\) lies inside .dvc;"):
        load_params(project(tmp_path, raw))


def test_load_params_names_keys_dvc_reads_and_params_lack(tmp_path: Path) -> None:
    dvc = {
        "stages": {
            "download": {"cmd": "x", "params": ["data.source", "seed"]},
            "train": {"foreach": "${archs}", "do": {"cmd": "x", "params": ["train.${item}", "runtime", {"other.yaml": ["k"]}]}},
            "odd": "not a stage",
        }
    }
    raw = {"data": SYNTH, "seed": 1, "archs": ["a", "b", 3], "train": {"a": RECIPE, "b": RECIPE}, "runtime": {}}
    assert missing_dvc_params(tmp_path, raw) == []
    project(tmp_path, raw, dvc)
    assert missing_dvc_params(tmp_path, raw) == []
    assert missing_dvc_params(tmp_path, {"data": {}}) == [
        ("download", "data.source"),
        ("download", "seed"),
        ("train", "archs"),  # DVC cannot parse dvc.yaml without what its foreach names
    ]
    assert missing_dvc_params(tmp_path, {"archs": ["a"], "data": {}}) == [
        ("download", "data.source"),
        ("download", "seed"),
        ("train@a", "train.a"),
        ("train@a", "runtime"),
    ]
    with pytest.raises(
        ConfigError,
        match=r"params.yaml: data.source: dvc.yaml's stage download reads this "
        r"key and params.yaml lacks it .*`\{\}` \(2 more missing\)$",
    ):
        load_params(project(tmp_path, {"data": {}}, dvc))
    with pytest.raises(ConfigError, match=r"lacks it \(DVC would stop there\); add it, e.g. as an empty mapping `\{\}`$"):
        load_params(project(tmp_path, {"data": SYNTH, "archs": ["a"], "train": {"a": RECIPE}, "runtime": {}}, dvc))


def test_dvc_outputs_are_the_folders_before_templates(tmp_path: Path) -> None:
    assert dvc_outputs(tmp_path) == []
    (tmp_path / "dvc.yaml").write_text("stages: [1, 2]")
    assert dvc_outputs(tmp_path) == []
    (tmp_path / "dvc.yaml").write_text(": : :")
    assert dvc_outputs(tmp_path) == []
    dvc = {
        "stages": {
            "a": {"outs": ["out/a", {"out/b": {"cache": False}}], "metrics": ["m.json"], "plots": ["${x}/p"]},
            "t": {"foreach": "${archs}", "do": {"outs": ["models/${item}/w"]}},
            "z": "x",
        }
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    assert dvc_outputs(tmp_path) == ["out/a", "out/b", "m.json", ".", "models"]


def test_champion_dir_must_be_a_folder_of_its_own(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"a": {"outs": ["reports/out"]}}}))
    check_champion_dir("champion", root)
    check_champion_dir(str(tmp_path / "elsewhere"), root)
    check_champion_dir("reports/mine", root)
    cases = {
        "": "is not a folder path",
        "  ": "is not a folder path",
        "a\0b": "is not a folder path",
        "/": "is the filesystem root /",
        "..": "is an ancestor of the project folder",
        ".": "is the project folder itself",
        "data/champion": "lies inside data/ \\(DVC's outputs\\)",
        "data": "lies inside data/",
        ".git": "lies inside .git",
        "reports/out/x": "lies inside the DVC output reports/out",
        "x" * 5000: "cannot be used: OSError",
    }
    for value, message in cases.items():
        with pytest.raises(ValueError, match=message):
            check_champion_dir(value, root)
    (tmp_path / "real").mkdir()
    (root / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match=r"^\S+/proj/link is a symlink; the registry must be a real folder \(remove the link\)$"):
        check_champion_dir("link", root)
    (root / "sneaky").symlink_to(root / "data")
    with pytest.raises(ValueError, match="lies inside data/"):
        check_champion_dir("sneaky", root)
    (root / "up").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="is an ancestor"):
        check_champion_dir("up", root)


def test_to_yaml_keeps_the_models_field_order() -> None:
    text = resolve({"data": SYNTH}).to_yaml()
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith(" ")]
    assert keys == list(Params.model_fields)  # profile, seed, data, ...: not sorted
    assert yaml.safe_load(text)["data"]["source"] == SYNTH["source"]


def test_deep_merge_never_shares_nested_values_with_its_inputs() -> None:
    base = {"kept": {"inner": [1]}}
    overlay = {"new": {"inner": [2]}}
    merged = deep_merge(base, overlay)
    merged["kept"]["inner"].append(9)
    merged["new"]["inner"].append(9)
    assert base == {"kept": {"inner": [1]}} and overlay == {"new": {"inner": [2]}}


def test_synth_parts_split_at_the_first_equals_and_take_twelve_digits() -> None:
    assert SynthSpec.parse("synth:train=10,test=10,seed=000000000001").seed == 1  # 12 digits: still a number
    with pytest.raises(ValueError, match=r"^bad synth source part 'seed=0000000000001'; expected key=integer"):
        SynthSpec.parse("synth:train=10,test=10,seed=0000000000001")
    with pytest.raises(ValueError, match=r"^bad synth source part 'train=1=2'; expected key=integer, e.g. synth:train=2000"):
        SynthSpec.parse("synth:train=1=2")
