"""docs/config.md is generated from the config dataclasses' field docstrings and must be current."""

from __future__ import annotations

import dataclasses

import pytest

from vlscale import configdoc
from vlscale.config import TrainConfig


def test_config_reference_is_current() -> None:
    text = configdoc.render()
    assert configdoc.DOC_PATH.read_text() == text, (
        "docs/config.md is stale: run `python -m vlscale.configdoc` and commit it")
    for section in ("model", "data", "train", "loss", "gradcache", "engine", "techniques", "eval"):
        assert f"## `{section}` —" in text
    for f in dataclasses.fields(TrainConfig):  # every field, with its docstring
        assert f"| `train.{f.name}` |" in text
    assert "| `train.steps` | int | `1000` | Number of optimizer steps. |" in text
    assert configdoc.main(["--check"]) == 0


def test_a_field_without_a_docstring_is_an_error(tmp_path) -> None:
    @dataclasses.dataclass
    class Bad:
        """A section."""

        documented: int = 1
        """Has one."""
        bare: int = 2

    with pytest.raises(ValueError, match=r"Bad\.bare has no docstring"):
        configdoc.section_markdown("bad", Bad)
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    assert configdoc.main(["--check", "--out", str(stale)]) == 1
    assert configdoc.main(["--out", str(stale)]) == 0 and stale.read_text() == configdoc.render()
