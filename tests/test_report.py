"""The leaderboard's link to the curves `dvc plots show` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifarflow.report import PLOTS, plots_link, render


@pytest.mark.parametrize(("out", "link"), [("data/reports", "../../dvc_plots/index.html"), (".", "dvc_plots/index.html")])
def test_plots_link_is_relative_to_the_leaderboard(out: str, link: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the project: where dvc runs the report stage and `dvc plots show`
    assert plots_link(Path(out)) == link
    assert (tmp_path / out / link).resolve() == (tmp_path / PLOTS).resolve()


def test_rendered_leaderboard_uses_the_link() -> None:
    markdown = render([], None, "smoke", "../../dvc_plots/index.html")
    assert f"[{PLOTS}](../../dvc_plots/index.html)" in markdown
