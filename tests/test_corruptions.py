"""The corruption benchmark: each corruption against what it is defined to do (closed forms where
there are, statistics where it is random, ImageMagick where it is installed), seeded bytes, the
corrupt stage's shards, manifest and verdict, and the mCA scoring."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_png_later, make_params, tree_files

from cifarflow import robustness, settings
from cifarflow.data import corrupt, shards
from cifarflow.data import corruptions as c
from cifarflow.errors import InputError
from cifarflow.settings import resolve

RNG = np.random.default_rng(7)
IMAGES = RNG.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
GREY = np.full((4, 32, 32, 3), 128, np.uint8)


def smooth_images(n: int = 12) -> np.ndarray:
    """Photographs are smooth: gradients and a few blobs, so blurs and JPEG change them by
    amounts that grow with severity (white noise would be flattened by severity 1 already)."""
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    out = []
    for i in range(n):
        r = np.random.default_rng(i)
        a, b, cx, cy = r.uniform(0, 1, 4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)
        out.append(np.stack([a * xx + (1 - a) * yy, blob, b * (1 - xx) + 0.3 * blob], -1))
    return (np.clip(np.array(out), 0, 1) * 255).astype(np.uint8)


def test_fourteen_families_without_frost_each_with_five_severities() -> None:
    assert len(c.FAMILIES) == 14 and "frost" not in c.FAMILIES
    assert all(len(levels) == 5 for levels in c.SEVERITIES.values()) and set(c.SEVERITIES) == set(c.FAMILIES)


@pytest.mark.parametrize("family", list(c.FAMILIES))
def test_each_corruption_is_seeded_shaped_and_changes_the_image(family: str) -> None:
    images = smooth_images()
    first = c.corrupt(images, family, 3, seed=0)
    assert first.dtype == np.uint8 and first.shape == images.shape
    assert np.array_equal(first, c.corrupt(images, family, 3, seed=0))  # same seed, same bytes
    assert not np.array_equal(first, images)
    # the random ones depend on the seed (and only on it, above); the others on nothing
    other = c.corrupt(images, family, 3, seed=1)
    random = family in {
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "glass_blur",
        "motion_blur",
        "snow",
        "fog",
        "elastic_transform",
    }
    assert np.array_equal(first, other) != random


MONOTONE = [f for f in c.FAMILIES if f not in {"glass_blur", "elastic_transform"}]  # their published levels are not ordered


@pytest.mark.parametrize("family", MONOTONE)
def test_the_highest_severity_changes_the_images_most(family: str) -> None:
    images = smooth_images()
    change = [np.abs(c.corrupt(images, family, s, 0).astype(int) - images).mean() for s in (1, 3, 5)]
    # not strictly ordered below 5: truncating to uint8 moves a mild blur's pixels down a level
    assert change[2] > max(change[:2]), change


def test_contrast_brightness_pixelate_follow_their_closed_forms() -> None:
    x = IMAGES / 255.0
    for s, factor in enumerate(c.SEVERITIES["contrast"], 1):
        mean = x.mean(axis=(1, 2), keepdims=True)
        want = (np.clip((x - mean) * factor + mean, 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(c.contrast(IMAGES, s, RNG), want)
    # a grey pixel's HSV value is its level: brightness adds the severity's amount to it
    for s, shift in enumerate(c.SEVERITIES["brightness"], 1):
        assert np.all(c.brightness(GREY, s, RNG) == int((128 / 255 + shift) * 255))
    # a flat image survives box down- and up-sampling; JPEG keeps it within a level
    assert np.array_equal(c.pixelate(GREY, 5, RNG), GREY)
    assert np.abs(c.jpeg_compression(GREY, 5, RNG).astype(int) - 128).max() <= 1


def test_noise_has_the_published_strength() -> None:
    flat = np.full((50, 32, 32, 3), 128, np.uint8)
    rng = np.random.default_rng(0)
    for s, sigma in enumerate(c.SEVERITIES["gaussian_noise"], 1):
        noise = c.gaussian_noise(flat, s, rng) / 255.0 - 128 / 255.0
        assert abs(noise.std() - sigma) < 0.004, (s, noise.std(), sigma)
    for s, amount in enumerate(c.SEVERITIES["impulse_noise"], 1):
        out = c.impulse_noise(flat, s, rng)
        assert abs(np.isin(out, (0, 255)).mean() - amount) < 0.003
        assert abs((out == 255).mean() - amount / 2) < 0.003  # salt and pepper alike
    for s, photons in enumerate(c.SEVERITIES["shot_noise"], 1):
        out = c.shot_noise(flat, s, rng) / 255.0
        want = np.sqrt((128 / 255) / photons)  # Poisson: variance = mean / photons
        assert abs(out.std() - want) < 0.1 * want and abs(out.mean() - 128 / 255) < 0.01


def test_defocus_kernel_is_a_normalised_disk() -> None:
    for radius, alias in c.SEVERITIES["defocus_blur"]:
        kernel = c._disk(radius, alias)
        assert kernel.shape == (17, 17) and abs(kernel.sum() - 1) < 1e-5
        assert np.allclose(kernel, kernel.T) and np.allclose(kernel, kernel[::-1])
        assert kernel[8, 8] == kernel.max()
    # a wider disk spreads more: less weight at the centre
    centres = [c._disk(r, a)[8, 8] for r, a in c.SEVERITIES["defocus_blur"]]
    assert centres[3] > centres[4] and centres[0] > centres[4]


def test_motion_blur_of_a_point_lies_along_the_angle() -> None:
    point = np.zeros((32, 32), np.uint8)
    point[16, 16] = 255
    for angle, (dx, dy) in ((0, (-1, 0)), (90, (0, -1)), (180, (1, 0))):
        out = c.imagemagick_motion_blur(point, 6, 2, angle).astype(int)
        # a pixel reads the ones along +angle, so the point is smeared towards -angle
        ys, xs = np.nonzero(out)
        assert set(np.sign(xs - 16)) <= {0, dx} and set(np.sign(ys - 16)) <= {0, dy}, (angle, xs, ys)
        assert len(xs) >= 4 and out[16, 16] == out.max()


def imagemagick() -> str | None:
    for name in ("magick", "convert"):
        path = shutil.which(name)
        if path:
            done = subprocess.run([path, "-version"], capture_output=True, text=True)
            if done.stdout.startswith("Version: ImageMagick"):
                return path
    return None


REQUIRE_IMAGEMAGICK = "CIFARFLOW_REQUIRE_IMAGEMAGICK"  # .ci/run sets it: there the comparison must run


def test_motion_blur_is_imagemagicks(tmp_path: Path) -> None:
    """snow and motion_blur use ImageMagick's motion blur in the published script: compare on
    colour and grey images, the script's (radius, sigma) pairs and angles all round. Without
    ImageMagick it skips, saying so, except where CIFARFLOW_REQUIRE_IMAGEMAGICK is set (CI): there
    a missing ImageMagick fails the test."""
    if imagemagick() is None:
        if os.environ.get(REQUIRE_IMAGEMAGICK):
            pytest.fail(
                f"ImageMagick is not installed but {REQUIRE_IMAGEMAGICK} is set: install it (apt-get install imagemagick)"
            )
        pytest.skip("ImageMagick is not installed: motion blur not compared with it")
    from PIL import Image

    images = np.concatenate([smooth_images(4), IMAGES[:4]])
    pairs = c.SEVERITIES["motion_blur"] + [s[4:6] for s in c.SEVERITIES["snow"]]
    differing = total = 0
    for k, (radius, sigma) in enumerate(pairs):
        image = images[k % len(images)]
        image = image if k % 2 else image[..., 0]  # grey, as snow's layer
        angle = -135 + 17.3 * k
        Image.fromarray(image).save(tmp_path / "in.png")
        subprocess.run(
            [imagemagick(), str(tmp_path / "in.png"), "-motion-blur", f"{radius}x{sigma}+{angle}", str(tmp_path / "out.png")],
            check=True,
        )
        want = np.asarray(Image.open(tmp_path / "out.png").convert("RGB" if image.ndim == 3 else "L")).astype(int)
        got = c.imagemagick_motion_blur(image, radius, sigma, angle).astype(int)
        assert np.abs(got - want).max() <= 1, (radius, sigma, angle)
        differing += int((got != want).sum())
        total += want.size
    assert differing / total < 0.005, differing / total


def test_unknown_family_and_severity_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown corruption 'frost'"):
        c.corrupt(IMAGES, "frost", 1, 0)
    with pytest.raises(ValueError, match="severity 6"):
        c.corrupt(IMAGES, "fog", 6, 0)
    with pytest.raises(Exception, match="robustness.severities lists a value twice"):
        resolve({"robustness": {"severities": [1, 1]}})


# --- the corrupt stage ------------------------------------------------------------------------


def bench_params(**robust: object) -> settings.Params:
    return resolve(
        {
            "data": {"source": "synth:train=300,test=50", "md5": None, "val_size": 50, "shards": 2},
            "robustness": {"images": 30, "families": ["gaussian_noise", "pixelate", "snow"], "severities": [2, 5], **robust},
        }
    )


def test_corrupt_stage_writes_seeded_validated_shards(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    params = bench_params()
    manifest = corrupt.run(params, tiny_shards, verdict, tmp_path / "a")
    corrupt.run(params, tiny_shards, verdict, tmp_path / "b")
    assert tree_files(tmp_path / "a") == tree_files(tmp_path / "b")  # byte-identical, manifest and verdict included
    assert set(manifest["counts"]) == {
        "clean",
        "gaussian_noise-2",
        "gaussian_noise-5",
        "pixelate-2",
        "pixelate-5",
        "snow-2",
        "snow-5",
    }
    assert set(manifest["counts"].values()) == {30} and manifest["class_counts"] == [3] * 10  # stratified
    test = shards.read_parquet(shards.shard_paths(tiny_shards, "test", "parquet"))
    _, splits = corrupt.load(tmp_path / "a", params)
    rows = np.searchsorted(test.index, splits["clean"].index)
    assert np.array_equal(splits["clean"].images, test.images[rows])  # clean is the test images themselves
    assert np.array_equal(splits["snow-5"].images, c.corrupt(test.images[rows], "snow", 5, params.seed))
    assert all(np.array_equal(s.labels, test.labels[rows]) for s in splits.values())
    other = corrupt.run(resolve({**params.model_dump(mode="json"), "seed": 1}), tiny_shards, verdict, tmp_path / "c")
    assert other["shards"]["parquet/snow-5-00000-of-00001.parquet"] != manifest["shards"]["parquet/snow-5-00000-of-00001.parquet"]


def test_corrupt_stage_takes_every_image_when_asked_for_more(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    manifest = corrupt.run(bench_params(images=10_000), tiny_shards, verdict, tmp_path / "all")
    assert manifest["counts"]["clean"] == 50


def test_tampered_or_missing_cells_are_refused_by_name(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    params = bench_params()
    corrupt.run(params, tiny_shards, verdict, tmp_path / "a")
    with pytest.raises(InputError, match="has no fog-2.*rerun the corrupt stage"):
        corrupt.load(tmp_path / "a", bench_params(families=["fog"]))  # params changed, stage not rerun
    shard = tmp_path / "a" / "parquet" / "pixelate-5-00000-of-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="pixelate-5-00000-of-00001.parquet: sha256 differs"):
        corrupt.load(tmp_path / "a", params)
    with pytest.raises(InputError, match=r"nowhere/manifest.json: not found; run the corrupt stage first"):
        corrupt.load(tmp_path / "nowhere", params)
    (tmp_path / "a" / corrupt.VERDICT).unlink()
    with pytest.raises(InputError, match="verdict.json: not found"):
        corrupt.load(tmp_path / "a", params)


def test_corrupt_stage_refuses_unvalidated_shards(tiny_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        corrupt.run(bench_params(), tiny_shards, tmp_path / "no-verdict.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- scoring ----------------------------------------------------------------------------------


def test_mca_grid_relative_and_a_bootstrap_interval() -> None:
    clean = np.array([1, 1, 1, 1, 0] * 20, bool)  # 80% clean
    cells = {
        ("fog", 1): np.array([1, 1, 1, 0, 0] * 20, bool),  # 60%
        ("fog", 5): np.array([1, 0, 0, 0, 0] * 20, bool),  # 20%
        ("snow", 1): np.array([1, 1, 0, 0, 0] * 20, bool),  # 40%
    }
    got = robustness.score(cells, clean, seed=0)
    assert got["mca"] == pytest.approx(0.4) and got["clean_accuracy"] == pytest.approx(0.8)
    assert got["relative_mca"] == pytest.approx(0.5) and got["n"] == 100
    assert got["grid"] == {"fog": {"1": 0.6, "5": 0.2}, "snow": {"1": 0.4}}
    assert got["ci95_low"] < 0.4 < got["ci95_high"] and got == robustness.score(cells, clean, seed=0)
    # the interval is over images: each image's share of cells; here shares are 1, 2/3, 1/3, 0, 0 (sd 0.41)
    half_width = 1.96 * np.std([1, 2 / 3, 1 / 3, 0, 0]) / np.sqrt(100)
    assert (got["ci95_high"] - got["ci95_low"]) / 2 == pytest.approx(half_width, rel=0.15)


def test_scores_are_rounded_to_six_places_and_seeded_as_documented() -> None:
    rng = np.random.default_rng(7)
    clean = rng.random(301) < 0.6  # many images and cells: resampled means fine-grained enough to tell seeds apart
    cells = {("fog", s): rng.random(301) < 0.5 for s in (1, 2, 3)} | {(f"f{k}", 1): rng.random(301) < 0.5 for k in range(10)}
    got = robustness.score(cells, clean, seed=3)
    matrix = np.stack(list(cells.values())).astype(float)
    mca = matrix.mean()
    assert got["mca"] == round(mca, 6) != round(mca, 7) and got["resamples"] == robustness.RESAMPLES == 2000
    assert got["relative_mca"] == round(mca / clean.mean(), 6) != round(mca / clean.mean(), 7)
    assert got["clean_accuracy"] == round(clean.mean(), 6) != round(clean.mean(), 7)
    assert got["grid"]["fog"] == {str(s): round(float(cells["fog", s].mean()), 6) for s in (1, 2, 3)} and len(got["grid"]) == 11
    # the interval: percentiles 2.5 and 97.5 of the image-resampled means, from the generator (seed, 0xC1FA)
    picks = np.random.default_rng([3, 0xC1FA]).integers(0, 301, (2000, 301))
    low, high = np.percentile(matrix.mean(axis=0)[picks].mean(axis=1), [2.5, 97.5])
    assert (got["ci95_low"], got["ci95_high"]) == (round(low, 6), round(high, 6))
    other = np.percentile(
        matrix.mean(axis=0)[np.random.default_rng([3, 0xC1FB]).integers(0, 301, (2000, 301))].mean(axis=1), [2.5, 97.5]
    )
    assert round(other[0], 6) != got["ci95_low"] and round(other[1], 6) != got["ci95_high"]  # the case tells generators apart
    nothing = robustness.score(cells, np.zeros(301, bool), seed=3)
    assert nothing["relative_mca"] is None and nothing["clean_accuracy"] == 0.0


def test_heatmap_is_deterministic() -> None:
    grid = {"fog": {"1": 0.6, "5": 0.2}, "snow": {"1": 0.4, "5": 0.1}}
    assert_same_png_later(lambda: robustness.heatmap_png(grid, "t"))


def test_manifest_is_json_with_its_provenance(tiny_shards: Path, verdict: Path, tmp_path: Path) -> None:
    manifest = corrupt.run(bench_params(), tiny_shards, verdict, tmp_path / "a")
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["source"]["families"] == ["gaussian_noise", "pixelate", "snow"]
    assert on_disk["source"]["severities"] == [2, 5] and len(on_disk["source"]["test_manifest_sha256"]) == 64


def test_make_params_has_the_cpu_default() -> None:
    params = make_params()
    assert params.robustness.images == 2000 and params.robustness.severities == [1, 2, 3, 4, 5]
    assert params.robustness.families == list(c.FAMILIES)


def test_glass_blur_moves_each_pixel_at_most_one_step_up_or_left() -> None:
    """Severity 1's blur (sigma 0.05) is the identity up to the script's truncation, so what is
    left is the jitter: as the published script really runs it (its tuple swap of numpy views
    copies one way), each pixel of rows and columns 2..31 takes its own value or that of the pixel
    above, left or above-left; rows and columns 0 and 1 keep theirs."""
    out = c.glass_blur(IMAGES, 1, np.random.default_rng(0)).astype(int)
    x = IMAGES.astype(int)
    candidates = np.stack([x[:, 1:, 1:], x[:, :-1, 1:], x[:, 1:, :-1], x[:, :-1, :-1]])  # self, up, left, up-left
    nearest = np.abs(candidates - out[None, :, 1:, 1:]).min(axis=0)[:, 1:, 1:]  # rows and columns 2..31
    assert nearest.max() <= 1  # one level: the script's truncation of a blur by sigma 0.05
    assert np.abs(out[:, :2] - x[:, :2]).max() <= 1 and np.abs(out[:, :, :2] - x[:, :, :2]).max() <= 1
    moved = np.abs(out[:, 2:, 2:] - x[:, 2:, 2:]) > 1
    assert 0.5 < moved.mean() < 0.9  # three of the four choices move the pixel (random images: ~3/4 differ)
