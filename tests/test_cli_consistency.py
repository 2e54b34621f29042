"""``attnctrl consistent``: option parsing and an end-to-end run on the shapes model."""

from __future__ import annotations

import json
import os

import pytest

from attnctrl.cli import main
from attnctrl.cli.options import OptionError, parse_subject


def test_parse_subject():
    assert parse_subject('cat="a photo of a cat"@cat') == ("cat", '"a photo of a cat"', "cat")
    assert parse_subject("red=a red circle@circle") == ("red", "a red circle", "circle")
    assert parse_subject("x=an e-mail @ work@work") == ("x", "an e-mail @ work", "work")
    for bad in ("noequals@x", "name=prompt-without-word", "=a cat@cat", "a=@cat", "a=a cat@"):
        with pytest.raises(OptionError):
            parse_subject(bad)


def test_bad_options_fail_cleanly(capsys, tmp_path):
    assert main(["consistent", "--subject", "broken", "--scene", "a cat", "--out", str(tmp_path)]) == 2
    assert "NAME=" in capsys.readouterr().err
    assert main(["consistent", "--subject", "a=a red circle@circle", "--out", str(tmp_path)]) == 2
    assert "--scene" in capsys.readouterr().err
    assert main(["consistent", "--subject", "a=a red circle@circle", "--scene", "a circle", "--dropout", "2", "--out", str(tmp_path)]) == 2
    assert "dropout" in capsys.readouterr().err
    code = main(["consistent", "--subject", "a=a red circle@square", "--scene", "a square", "--steps", "2", "--out", str(tmp_path / "w")])
    assert code == 2
    assert "not in the prompt" in capsys.readouterr().err


def test_consistent_writes_references_scenes_masks_and_run_json(tmp_path, capsys):
    out = tmp_path / "run"
    code = main([
        "consistent", "--subject", "red=a red circle@circle", "--subject", "blue=a blue square@square",
        "--scene", "a circle on the left and a square on the right", "--scene", "a square at the top",
        "--steps", "3", "--out", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    files = set(os.listdir(out))
    assert {"reference_red.png", "reference_blue.png", "scene_0.png", "scene_1.png", "run.json"} <= files
    assert {"scene_0_mask_red.png", "scene_0_mask_blue.png", "scene_1_mask_blue.png"} <= files
    record = json.loads((out / "run.json").read_text())
    assert record["scene_subjects"] == [["red", "blue"], ["blue"]]
    assert record["settings"]["mutual_cross"] == 0.9
