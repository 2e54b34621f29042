"""SD3 and Flux folders through ``load_pipeline``, the ``attnctrl edit`` command and the app's model box."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from attnctrl import cli
from attnctrl.errors import UnsupportedModelError

from mmdit_models import build_flux, build_sd3, build_t5_tokenizer

SOURCE = "a photo of a cat on the grass"
EDITED = "a photo of a tiger on the grass"


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model_dir(request, tokenizer, tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    t5 = build_t5_tokenizer()
    if request.param == "sd3":
        pipe = build_sd3(tokenizer, t5, cls=StableDiffusion3Pipeline, layers=1)
    else:
        pipe = build_flux(tokenizer, t5, cls=FluxPipeline, double=1, single=1)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    pipe.save_pretrained(path)
    return str(path), request.param


def test_load_pipeline_picks_the_mmdit_class(model_dir):
    from attnctrl.pipelines import Prompt2PromptFluxPipeline, Prompt2PromptSD3Pipeline, load_pipeline
    from attnctrl.pipelines.inversion import image_geometry

    path, family = model_dir
    pipe = load_pipeline(path)
    assert type(pipe) is (Prompt2PromptSD3Pipeline if family == "sd3" else Prompt2PromptFluxPipeline)
    native, multiple = image_geometry(pipe)
    assert multiple == 4  # VAE factor 2 x patch 2
    assert native == (32 if family == "sd3" else 256)


def test_unsupported_variants_are_refused(tmp_path):
    from attnctrl.pipelines import load_pipeline

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Img2ImgPipeline"}))
    with pytest.raises(UnsupportedModelError, match="SD3/SD3.5 and Flux.1"):
        load_pipeline(str(tmp_path))


def test_cli_edit_writes_attention_png(model_dir, tmp_path, capsys):
    path, family = model_dir
    out = tmp_path / "run"
    code = cli.main([
        "edit", "--model", path, "--steps", "2", "--size", "32x48", "--out", str(out),
        "--prompt", SOURCE, "--to", EDITED, "--blend", "cat,tiger", "--weight", "tiger=2", "--seed", "3",
    ])
    assert code == 0, capsys.readouterr().err
    for name in ("source.png", "edit_1.png", "grid.png", "attention.png"):
        with Image.open(out / name) as im:
            im.verify()
    with Image.open(out / "source.png") as im:
        assert im.size == (32, 48)
    run = json.loads((out / "run.json").read_text())
    assert run["pipeline"] == ("Prompt2PromptSD3Pipeline" if family == "sd3" else "Prompt2PromptFluxPipeline")
    assert run["files"]["attention"] == "attention.png"


def test_app_edit_and_maps(model_dir):
    """The app's model box loads an SD3/Flux folder; an edit and its attention figure run."""
    from attnctrl.app import actions, options
    from attnctrl.app.models import ModelCache

    path, _ = model_dir
    model = ModelCache(device="cpu", dtype="fp32").get(path)
    assert "native size" in model.describe()
    form = options.edit_form(SOURCE, EDITED, "replace", "", "cat, tiger", 0.8, "", 0.3)
    result = actions.run_edit(model, form, seed=1, steps=2, guidance=3.5, size=(32, 32))
    assert len(result.images) == 2 and result.attention.word_maps(1, "tiger").shape == (8, 8)
    assert actions.attention_figure(result) is not None


def test_cli_refuses_ddpm_samplers_on_flow_models(model_dir, tmp_path, capsys):
    path, _ = model_dir
    code = cli.main(["edit", "--model", path, "--steps", "2", "--size", "32x32", "--out", str(tmp_path / "o"),
                     "--prompt", SOURCE, "--to", EDITED, "--scheduler", "ddim"])
    assert code == 2
    assert "leave --scheduler unset" in capsys.readouterr().err
    assert not (tmp_path / "o" / "source.png").exists()


def test_cli_negative_prompt_and_true_cfg(model_dir, tmp_path, capsys):
    """--negative-prompt goes to every model's unconditional call; on Flux it needs --true-cfg (the
    guidance-distilled model has no unconditional call otherwise), which only Flux takes."""
    path, family = model_dir
    base = ["edit", "--model", path, "--steps", "2", "--size", "32x32", "--prompt", SOURCE, "--to", EDITED, "--seed", "1"]
    bad = ["--negative-prompt", "a dog"] if family == "flux" else ["--true-cfg", "2", "--negative-prompt", "a dog"]
    assert cli.main(base + ["--out", str(tmp_path / "bad")] + bad) == 2
    assert ("needs --true-cfg" if family == "flux" else "applies to Flux") in capsys.readouterr().err
    good = ["--negative-prompt", "a dog"] + (["--true-cfg", "2.5"] if family == "flux" else [])
    out = tmp_path / "good"
    assert cli.main(base + ["--out", str(out)] + good) == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["negative_prompt"] == "a dog" and run["true_cfg"] == (2.5 if family == "flux" else None)
    if family == "flux":
        assert cli.main(base + ["--out", str(tmp_path / "one"), "--negative-prompt", "a dog", "--true-cfg", "1"]) == 2
        assert "above 1" in capsys.readouterr().err
