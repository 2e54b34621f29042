"""The benchmark scripts' report code runs: tiny settings of ``benchmarks/inversion.py`` (UNet and
flow tables), written to a temporary folder. Figures are the benchmarks' business; this catches a
script that crashes after its long measurement part."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture()
def inversion_script(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import inversion

    return inversion


def test_inversion_benchmark_unet_tables(inversion_script, tmp_path, capsys):
    assert inversion_script.main(["--images", "1", "--steps", "2", "--edits", "--only", "ddim", "--swap-seeds", "1",
                                  "--blend-threshold", "0.5", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "inversion.json").read_text())
    assert "target_met" in payload and (tmp_path / "inversion.md").exists()
    # every kept source is swapped to three colours by the asked method only (not by the null-text baseline)
    kept = len(inversion_script.SWAP_SOURCES) - len(payload["swap_sources_skipped"])
    assert kept > 0 and set(payload["swaps"]) == {"ddim"} and len(payload["swaps"]["ddim"]) == 3 * kept
    assert "Colour swap from each inversion" in (tmp_path / "inversion.md").read_text()
    assert "colour and >= 35 dB" in (tmp_path / "inversion.md").read_text()
    assert "LocalBlend([shape], threshold=0.5)" in (tmp_path / "inversion.md").read_text()


def test_inversion_benchmark_flow_tables(inversion_script, tmp_path, capsys):
    assert inversion_script.main(["--model", "shapes-flow", "--images", "2", "--steps", "3", "--only", "rf-bdia",
                                  "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "inversion_flow.json").read_text())
    assert payload["target_met_bdia"] is True and "rf-bdia" in payload["results"]
    assert "rf-bdia (exact inversion): met" in (tmp_path / "inversion_flow.md").read_text()
