"""``attnctrl invert`` and ``attnctrl edit --image / --inversion`` on the embedded shapes model."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from attnctrl import cli
from attnctrl.cli import commands as cli_commands
from attnctrl.cli import run as cli_run
from attnctrl.inversion import Inversion
from attnctrl.models import SHAPES

SOURCE = "a red circle on the left"
EDITED = "a blue circle on the left"
STEPS = "4"


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    """A shapes-like scene: a red circle on the left of a gray background (64x64, the model's size)."""
    path = tmp_path_factory.mktemp("images") / "circle.png"
    im = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(im).ellipse((6, 20, 28, 42), fill=(220, 30, 30))
    im.save(path)
    return str(path)


@pytest.fixture(scope="module")
def inverted(image_path, tmp_path_factory):
    """(inversion file, stdout) of one ``attnctrl invert`` run, shared by the tests below."""
    path = tmp_path_factory.mktemp("inversion") / "circle.safetensors"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["invert", image_path, "--prompt", SOURCE, "--steps", STEPS, "-o", str(path)])
    assert code == 0
    return str(path), stdout.getvalue()


@pytest.fixture(scope="module")
def shapes_pipe():
    import torch

    from attnctrl.pipelines import load_pipeline

    pipe = load_pipeline(SHAPES, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_error_line(err: str, message: str) -> None:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err


def test_invert_writes_a_loadable_file(inverted):
    path, stdout = inverted
    inv = Inversion.load(path)
    assert inv.method == "null-text"
    assert inv.prompts == (SOURCE,)
    assert inv.num_images == 1 and inv.num_inference_steps == int(STEPS)
    assert (inv.width, inv.height) == (64, 64) and inv.guidance_scale == 7.5
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    summary = lines[0]
    assert path in summary and "null-text" in summary and "1 image" in summary and f"{STEPS} steps" in summary
    assert f"{inv.stats['unet_evaluations']} UNet evaluations" in summary and summary.endswith(" s")


def test_edit_from_inversion_row_0_is_the_reconstruction(inverted, shapes_pipe, tmp_path, capsys):
    from attnctrl.pipelines import reconstruct

    path, _ = inverted
    out = tmp_path / "edit"
    # explicit settings equal to the inversion's are accepted
    code = cli.main(["edit", "--inversion", path, "--prompt", SOURCE, "--to", EDITED, "--steps", STEPS,
                     "--guidance", "7.5", "--size", "64x64", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out.split()
    for name in ("source.png", "edit_1.png", "grid.png", "attention.png", "run.json"):
        assert (out / name).exists() and str(out / name) in printed
    expected = np.asarray(reconstruct(shapes_pipe, Inversion.load(path), output_type="pil")[0], dtype=np.int16)
    with Image.open(out / "source.png") as im:
        got = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert got.shape == expected.shape == (64, 64, 3)
    assert np.abs(got - expected).max() <= 1
    run = json.loads((out / "run.json").read_text())
    assert run["prompts"] == [SOURCE, EDITED] and run["steps"] == int(STEPS) and run["seed"] is None
    assert run["inversion"]["method"] == "null-text" and run["inversion"]["file"] == path


@pytest.mark.parametrize("method", ["ddim", "edit-friendly"])
def test_edit_image_inverts_first(method, image_path, tmp_path, capsys):
    out = tmp_path / "edit"
    saved = tmp_path / "saved.safetensors"
    code = cli.main(["edit", "--image", image_path, "--method", method, "--steps", STEPS, "--prompt", SOURCE,
                     "--to", EDITED, "--save-inversion", str(saved), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for name in ("source.png", "edit_1.png", "grid.png", "run.json"):
        assert (out / name).exists()
    with Image.open(out / "edit_1.png") as im:
        assert im.size == (64, 64)
    inv = Inversion.load(saved)
    assert inv.method == method and inv.prompts == (SOURCE,) and inv.num_inference_steps == int(STEPS)
    assert inv.guidance_scale == (3.5 if method == "edit-friendly" else 7.5)  # the method's default guidance
    run = json.loads((out / "run.json").read_text())
    assert run["inversion"]["image"] == image_path and run["inversion"]["method"] == method
    assert "invert" in run["timings_s"]


@pytest.mark.parametrize("extra,message", [
    (["--prompt", "a red square on the left", "--to", "a blue square on the left"], "the first prompt must be"),
    (["--prompt", SOURCE, "--to", EDITED, "--steps", "10"], "num_inference_steps=10"),
    (["--prompt", SOURCE, "--to", EDITED, "--guidance", "3"], "guidance_scale=3"),
    (["--prompt", SOURCE, "--to", EDITED, "--size", "32x32"], "inverted at 64x64"),
], ids=["wrong-source-prompt", "steps", "guidance", "size"])
def test_inversion_mismatch_exit_2(extra, message, inverted, tmp_path, capsys):
    path, _ = inverted
    code = cli.main(["edit", "--inversion", path, *extra, "--out", str(tmp_path / "bad")])
    assert code == 2
    one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "bad" / "source.png").exists()


@pytest.mark.parametrize("command", ["invert", "edit"])
@pytest.mark.parametrize("content,message", [(b"not an image", "cannot read"), (None, "does not exist")],
                         ids=["unreadable", "missing"])
def test_bad_image_file_exit_2(command, content, message, tmp_path, capsys):
    image = tmp_path / "photo.png"
    if content is not None:
        image.write_bytes(content)
    if command == "invert":
        argv = ["invert", str(image), "--prompt", SOURCE, "-o", str(tmp_path / "x.safetensors")]
    else:
        argv = ["edit", "--image", str(image), "--prompt", SOURCE, "--to", EDITED, "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "out").exists()


def test_image_and_inversion_are_exclusive(image_path, inverted, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["edit", "--image", image_path, "--inversion", inverted[0], "--prompt", SOURCE, "--to", EDITED,
                  "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not allowed with" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra,message", [
    (["--inversion", "INV", "--seed", "3"], "--seed does not apply"),
    (["--image", "IMG", "--scheduler", "euler"], "DDIM"),
    (["--inversion", "INV", "--method", "ddim"], "--method applies to --image"),
    (["--save-inversion", "x.safetensors"], "--save-inversion applies to --image"),
    (["--index", "1"], "--index applies to --inversion"),
    (["--inversion", "INV", "--index", "3"], "holds 1 image"),
    (["--inversion", "missing.safetensors"], "no such file"),
    (["--image", "IMG", "--save-inversion", "x.pt"], "must end with .safetensors"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_real_image_usage_errors(extra, message, image_path, inverted, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):  # all of these are refused before a model is loaded
        raise AssertionError("loaded a model")

    monkeypatch.setattr(cli_run, "load_model", no_model)
    monkeypatch.chdir(tmp_path)
    extra = [{"INV": inverted[0], "IMG": image_path}.get(a, a) for a in extra]
    code = cli.main(["edit", "--prompt", SOURCE, "--to", EDITED, *extra, "--out", str(tmp_path / "out")])
    assert code == 2
    one_error_line(capsys.readouterr().err, message)


@pytest.mark.parametrize("extra,message", [
    (["--height", "64"], "both --height and --width"),
    (["--words", "circle"], "--method dpl"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--prompt", "b", "--prompt", "c"], "3 --prompt for 1 images"),
])
def test_invert_usage_errors(extra, message, image_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_run, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code = cli.main(["invert", image_path, "--prompt", SOURCE, *extra, "-o", str(tmp_path / "x.safetensors")])
    assert code == 2
    one_error_line(capsys.readouterr().err, message)


def test_method_choices_match_the_library():
    from attnctrl.inversion import METHODS

    parser = cli_commands.build_parser()
    invert = next(a for a in parser._subparsers._group_actions[0].choices["invert"]._actions if a.dest == "method")
    assert tuple(invert.choices) == METHODS and invert.default is None  # null-text on UNets, fireflow on SD3/Flux


def test_several_images_one_file_edit_one_with_index(image_path, tmp_path, capsys):
    other = tmp_path / "square.png"
    im = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(im).rectangle((36, 20, 58, 42), fill=(30, 30, 220))
    im.save(other)
    path = tmp_path / "two.safetensors"
    code = cli.main(["invert", image_path, str(other), "--prompt", SOURCE, "--prompt", "a blue square on the right",
                     "--method", "ddim", "--steps", "2", "-o", str(path)])
    assert code == 0
    assert "ddim inversion of 2 images" in capsys.readouterr().out
    assert Inversion.load(path).prompts == (SOURCE, "a blue square on the right")
    base = ["edit", "--inversion", str(path), "--prompt", "a blue square on the right", "--to", "a red square on the right"]
    assert cli.main([*base, "--out", str(tmp_path / "no-index")]) == 2
    one_error_line(capsys.readouterr().err, "choose one with --index 0..1")
    assert cli.main([*base, "--index", "1", "--out", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "edit_1.png") as edited:
        assert edited.size == (64, 64)
    assert not (tmp_path / "out" / "edit_2.png").exists()
