"""Bundle docs in the model zoo's template (issue 16 item 3), checked without running anything.

Each ``bundles/<name>/docs/README.md`` has the zoo's top-level sections as ``##`` headings, in the zoo's order;
``docs/data_license.txt`` exists and says something; ``eval_metrics`` in ``configs/metadata.json`` is a measured
number in (0, 1] for the bundles with a measured run (never the ``0.0`` placeholder), and that number is quoted in the
README's Performance section. MACL and MixCL have no test-split run yet: their Performance section must say so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())
TEMPLATE = [
    "Model Overview",
    "Data",
    "Training configuration",
    "Input",
    "Output",
    "Performance",
    "MONAI Bundle Commands",
    "References",
    "License",
]
# bundles whose eval_metrics come from a measured run (the others are pending and say so)
MEASURED = {"scratch_baseline", "localcl_selftrain"}


def _readme(name: str) -> str:
    return (BUNDLES / name / "docs" / "README.md").read_text(encoding="utf-8")


def _level2_headings(text: str) -> list[str]:
    """``## `` headings outside fenced code blocks."""
    out, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("## "):
            out.append(line[3:].strip())
    return out


def _section(text: str, heading: str) -> str:
    """Body of ``## heading`` up to the next ``## `` heading (``###`` subsections included)."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"no '## {heading}' section"
    return m.group(1)


def test_bundles_found():
    assert set(NAMES) >= {"scratch_baseline", "macl", "mixcl", "localcl_selftrain"}
    assert MEASURED <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_readme_has_zoo_sections_in_order(name):
    headings = _level2_headings(_readme(name))
    missing = [h for h in TEMPLATE if h not in headings]
    assert not missing, f"{name}/docs/README.md lacks '## ' sections {missing}"
    positions = [headings.index(h) for h in TEMPLATE]
    assert positions == sorted(positions), f"{name}/docs/README.md: sections out of the zoo's order: {headings}"
    # any extra sections come after the template's (Model-zoo checks, MONAI Label, ...)
    first = headings.index(TEMPLATE[0])
    assert headings[first : first + len(TEMPLATE)] == TEMPLATE, f"{name}: extra sections inside the template"


@pytest.mark.parametrize("name", NAMES)
def test_commands_run_from_the_bundle_folder(name):
    commands = _section(_readme(name), "MONAI Bundle Commands")
    assert f"cd bundles/{name}" in commands
    assert "python -m monai.bundle run --config_file configs/train.json" in commands
    assert "python -m monai.bundle run --config_file configs/inference.json" in commands


@pytest.mark.parametrize("name", NAMES)
def test_data_license(name):
    path = BUNDLES / name / "docs" / "data_license.txt"
    assert path.is_file(), f"{name} lacks docs/data_license.txt"
    text = path.read_text(encoding="utf-8")
    assert text.strip(), f"{name}/docs/data_license.txt is empty"
    assert "phantom" in text and "Apache" in text


@pytest.mark.parametrize("name", NAMES)
def test_eval_metrics_measured_and_documented(name):
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text(encoding="utf-8"))
    metrics = meta["eval_metrics"]
    assert metrics, f"{name}: empty eval_metrics"
    performance = _section(_readme(name), "Performance")
    if name not in MEASURED:
        assert "pending" in performance, f"{name}: no measured eval_metrics and the Performance section does not say so"
        return
    for key, value in metrics.items():
        where = f"{name}: eval_metrics.{key} = {value!r}"
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert 0.0 < value <= 1.0, f"{where} (a placeholder or not a Dice)"
        assert f"{value:.3f}" in performance, f"{where} is not quoted in its Performance section"
        assert f"`eval_metrics.{key}`" in performance
