"""The ``attnctrl`` command line, end to end on a tiny saved pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from attnctrl import cli
from attnctrl.cli import commands as cli_commands
from attnctrl.cli import options as cli_options
from attnctrl.cli import run as cli_run
from attnctrl.errors import WordNotFoundError

SOURCE = "a photo of a cat on the grass"
EDITED = "a photo of a tiger on the grass"


@pytest.fixture(scope="module")
def model_dir(sd_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    sd_pipe.save_pretrained(path)
    return str(path)


def edit_args(model_dir, out, *extra):
    return ["edit", "--model", model_dir, "--steps", "2", "--size", "32x32", "--out", str(out), *extra]


def check_png(path, size=(32, 32)):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size


def test_edit_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(edit_args(
        model_dir, out,
        "--prompt", SOURCE, "--to", EDITED,
        "--blend", "cat,tiger", "--weight", "grass=2", "--cross", "0.8", "--cross", "tiger=0.4", "--self", "0.1,0.5",
        "--seed", "3", "--scheduler", "euler",
    ))
    assert code == 0
    printed = capsys.readouterr().out.split()
    for name in ("source.png", "edit_1.png"):
        check_png(out / name)
        assert str(out / name) in printed
    check_png(out / "grid.png", size=None)
    check_png(out / "attention.png", size=None)
    assert Image.open(out / "grid.png").size[0] > Image.open(out / "grid.png").size[1]
    run = json.loads((out / "run.json").read_text())
    assert run["prompts"] == [SOURCE, EDITED]
    assert run["seed"] == 3 and run["steps"] == 2 and run["size"] == [32, 32]
    assert run["scheduler"] == "EulerDiscreteScheduler"
    assert run["edit"]["type"] == "Reweight" and run["edit"]["weights"] == {"grass": 2.0}
    base = run["edit"]["base"]
    assert base["type"] == "Replace" and base["cross_steps"] == {"default": [0.0, 0.8], "tiger": [0.0, 0.4]}
    assert base["self_steps"] == [0.1, 0.5] and base["blend"]["words"] == [["cat"], ["tiger"]]
    assert base["shared_steps"] is None  # Replace's default (to the end with source context, on this UNet)
    assert run["attention_words"] == [["cat", "grass"], ["tiger", "grass"]]
    assert set(run["versions"]) >= {"attnctrl", "diffusers", "torch"}
    assert set(run["timings_s"]) >= {"load", "generate", "total"}
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_shared_option_reaches_the_replace(model_dir, tmp_path):
    common = ["--prompt", SOURCE, "--to", EDITED, "--seed", "1", "--cross", "0.3"]
    assert cli.main(edit_args(model_dir, tmp_path / "off", *common, "--shared", "off")) == 0
    assert json.loads((tmp_path / "off" / "run.json").read_text())["edit"]["shared_steps"] == [0.0, 0.3]  # = --cross
    assert cli.main(edit_args(model_dir, tmp_path / "part", *common, "--shared", "0.2,0.9")) == 0
    assert json.loads((tmp_path / "part" / "run.json").read_text())["edit"]["shared_steps"] == [0.2, 0.9]
    assert cli.main(edit_args(model_dir, tmp_path / "default", *common)) == 0
    with Image.open(tmp_path / "off" / "edit_1.png") as a, Image.open(tmp_path / "default" / "edit_1.png") as b:
        assert a.tobytes() != b.tobytes()  # the shared words' window changes the edited image


def test_blend_threshold_reaches_the_local_blend(model_dir, tmp_path):
    common = ["--prompt", SOURCE, "--to", EDITED, "--seed", "1", "--blend", "cat,tiger"]
    assert cli.main(edit_args(model_dir, tmp_path / "t", *common, "--blend-threshold", "0.6")) == 0
    assert json.loads((tmp_path / "t" / "run.json").read_text())["edit"]["blend"]["threshold"] == 0.6


def test_edit_negative_prompt(model_dir, tmp_path, capsys):
    """--negative-prompt reaches every prompt's unconditional row (and changes the images);
    --true-cfg is Flux's and is refused here."""
    common = ["--prompt", "a cat on the grass", "--to", "a dog on the grass", "--seed", "2"]
    assert cli.main(edit_args(model_dir, tmp_path / "plain", *common)) == 0
    assert cli.main(edit_args(model_dir, tmp_path / "neg", *common, "--negative-prompt", "blurry")) == 0
    run = json.loads((tmp_path / "neg" / "run.json").read_text())
    assert run["negative_prompt"] == "blurry" and run["true_cfg"] is None
    with Image.open(tmp_path / "plain" / "edit_1.png") as a, Image.open(tmp_path / "neg" / "edit_1.png") as b:
        assert a.tobytes() != b.tobytes()
    assert cli.main(edit_args(model_dir, tmp_path / "t", *common, "--negative-prompt", "x", "--true-cfg", "2")) == 2
    assert "applies to Flux" in capsys.readouterr().err


def test_edit_refine_several_edits(model_dir, tmp_path):
    out = tmp_path / "refine"
    code = cli.main(edit_args(
        model_dir, out, "--mode", "refine",
        "--prompt", "a cat on the grass", "--to", "a big cat on the grass", "--to", "a red cat on the beach",
    ))
    assert code == 0
    for name in ("source.png", "edit_1.png", "edit_2.png"):
        check_png(out / name)
    run = json.loads((out / "run.json").read_text())
    assert run["edit"]["type"] == "Refine" and len(run["prompts"]) == 3
    assert run["attention_words"] == [["grass"], ["big"], ["red", "beach"]]
    # --source-context / --no-source-context reach the edit (Refine: off unless asked)
    code = cli.main(edit_args(model_dir, tmp_path / "ctx", "--mode", "refine", "--source-context",
                              "--prompt", "a cat on the grass", "--to", "a big cat on the grass"))
    assert code == 0 and json.loads((tmp_path / "ctx" / "run.json").read_text())["edit"]["source_context"] is True


BAD = [
    # (extra arguments, text expected in the message)
    (["--prompt", "a photo of a cat", "--to", "a photo of a big cat"], "Refine"),  # word counts differ
    (["--prompt", SOURCE, "--to", EDITED, "--blend", "lion"], "lion"),  # blend word in no prompt
    (["--prompt", SOURCE, "--to", EDITED, "--weight", "cat=nan"], "finite"),
    (["--prompt", SOURCE, "--to", EDITED, "--weight", "cat"], "WORD=FACTOR"),
    (["--prompt", SOURCE, "--to", EDITED, "--size", "30x30"], "multiples of 8"),
    (["--prompt", SOURCE, "--to", EDITED, "--size", "big"], "WIDTHxHEIGHT"),
    (["--prompt", SOURCE, "--to", EDITED, "--cross", "1.5"], "past 1"),
    (["--prompt", SOURCE, "--to", EDITED, "--cross", "lion=0.3"], "lion"),
    (["--prompt", SOURCE, "--to", EDITED, "--blend", "cat,tiger,dog"], "3 comma-separated"),
    (["--prompt", SOURCE, "--weight", "cat=2", "--mode", "reweight", "--no-source-context"], "replace and refine"),
    (["--prompt", "a cat on the grass", "--to", "a big cat on the grass", "--mode", "refine", "--shared", "0.5"],
     "replace edits only"),
    (["--prompt", SOURCE, "--to", EDITED, "--shared", "1.5"], "past 1"),
    (["--prompt", SOURCE, "--to", EDITED, "--blend-threshold", "0.5"], "needs blend words"),
    (["--prompt", SOURCE, "--to", EDITED, "--blend", "cat,tiger", "--blend-threshold", "1.5"], "[0, 1]"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(b[0][4:]) or "mismatch" for b in BAD])
def test_bad_input_one_line_exit_2(extra, message, model_dir, tmp_path, capsys):
    code = cli.main(edit_args(model_dir, tmp_path / "bad", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "bad" / "source.png").exists()


def test_bad_model_path(tmp_path, capsys):
    code = cli.main(["edit", "--model", str(tmp_path / "nope"), "--prompt", "a", "--to", "b", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "no such folder" in err


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["edit", "--prompt", "a cat", "--mode", "swap", "--out", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_backends_lists_sdpa(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "sdpa" in out and "can run here" in out


def test_parsers():
    assert cli_options.parse_cross(None) == 0.8
    assert cli_options.parse_cross(["0.6"]) == 0.6
    assert cli_options.parse_cross(["0.2,0.7"]) == (0.2, 0.7)
    assert cli_options.parse_cross(["tiger=0.4"]) == {"default": 0.8, "tiger": 0.4}
    assert cli_options.parse_cross(["0.5", "tiger=0.1,0.3"]) == {"default": 0.5, "tiger": (0.1, 0.3)}
    assert cli_options.parse_weights(["red=2", "on the left=-1", "cat=0.5,3"]) == {"red": 2.0, "on the left": -1.0, "cat": (0.5, 3.0)}
    assert cli_options.parse_blend(["cat"], 2) == [["cat"], ["cat"]]
    assert cli_options.parse_blend(["cat,tiger", "grass"], 2) == [["cat", "grass"], ["tiger", "grass"]]
    assert cli_options.parse_size("64x48") == (64, 48) and cli_options.parse_size("512") == (512, 512)
    for bad in (lambda: cli_options.parse_cross(["0.5", "0.6"]), lambda: cli_options.parse_weights(["x=inf"]),
                lambda: cli_options.parse_weights(["=2"]), lambda: cli_options.parse_size("0x64"), lambda: cli_options.parse_window("1,2,3", "w")):
        with pytest.raises(cli_options.OptionError):
            bad()


def test_figure_words():
    words = cli_options.figure_words(["a red circle", "a blue circle"], blend=[["circle"], ["circle"]], weights={"blue": 2.0})
    assert words == [["red", "circle"], ["blue", "circle"]]
    assert cli_options.figure_words(["a cat", "a cat"], weights={"cat": 3.0}) == [["cat"], ["cat"]]


def test_user_errors_and_bugs_are_told_apart_by_type(monkeypatch, tmp_path, capsys):
    """An attnctrl error is one line and exit code 2; anything else is a bug: traceback, exit code 1."""
    def raising(exc):
        def load(*args, **kwargs):
            raise exc
        return load

    argv = ["edit", "--prompt", "a cat", "--to", "a dog", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(cli_run, "load_model", raising(WordNotFoundError("the word 'x' is not in the prompt")))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: the word 'x' is not in the prompt"
    monkeypatch.setattr(cli_run, "load_model", raising(KeyError("bug")))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'bug'" in err and "internal error (KeyError)" in err
    monkeypatch.setattr(cli_run, "load_model", raising(ValueError("from a library")))  # not ours: a bug too
    assert cli.main(argv) == 1
    assert not (tmp_path / "out").exists()  # nothing written by a run that failed before the work


def test_python_dash_m_help():
    res = subprocess.run([sys.executable, "-m", "attnctrl", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for command in ("edit", "demo", "backends", "train-shapes"):
        assert command in res.stdout


def test_train_shapes_forwards_to_the_training_parser(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train-shapes", "--help"])
    assert info.value.code == 0
    assert "--minutes" in capsys.readouterr().out


def test_demo_prompts_fit_the_shapes_vocabulary():
    """Every demo edit compiles against the shapes model's own tokenizer (words found, counts match)."""
    import attnctrl
    from transformers import CLIPTokenizer

    from attnctrl.models import SHAPES
    from attnctrl.plan import compile_edit

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(SHAPES, "tokenizer"))
    for spec in cli_commands.DEMO_EDITS:
        compile_edit(spec["edit"](attnctrl), tokenizer, spec["prompts"])
        assert len(spec["labels"]) == len(spec["prompts"]) == len(spec["words"])
        for i, words in enumerate(spec["words"]):
            for word in words:
                assert word in spec["prompts"][i].split()


@pytest.fixture
def keep_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_demo_flow(sd_pipe, monkeypatch, tmp_path, capsys, keep_threads):
    """The demo's files and JSON, with the tiny pipeline standing in for the shapes model."""
    monkeypatch.setattr(cli_run, "load_model", lambda model, device, dtype: sd_pipe)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "1"]) == 0
    printed = capsys.readouterr().out.split()
    check_png(out / "demo.png", size=None)
    figures = sorted(p.name for p in out.glob("attention_*.png"))
    assert len(figures) == len(cli_commands.DEMO_EDITS)
    for name in figures:
        check_png(out / name, size=None)
    record = json.loads((out / "demo.json").read_text())
    assert [e["name"] for e in record["edits"]] == [s["name"] for s in cli_commands.DEMO_EDITS]
    assert str(out / "demo.png") in printed and str(out / "demo.json") in printed


def test_every_subcommand_help_shows_examples_that_parse(capsys):
    import shlex

    parser = cli_commands.build_parser()
    for name in ("edit", "invert", "consistent", "speed", "batch", "demo", "app", "backends"):
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        shown = capsys.readouterr().out
        assert "examples:\n  attnctrl" in shown or "examples:\n  accelerate" in shown, name
        for line in cli_commands.EXAMPLES[name]:
            assert line in shown
            argv = shlex.split(line)
            argv = argv[argv.index("attnctrl") + 1:] if argv[0] == "accelerate" else argv[1:]
            assert parser.parse_args(argv).command == name
