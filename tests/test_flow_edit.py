"""FlowEdit (attnctrl.pipelines.flow_edit) on tiny random SD3 / Flux pipelines and on the embedded
flow-matching shapes model: the zero-delta identity, a measured colour edit, determinism,
transformer evaluation counts, argument errors, half precision, the CLI and batch jobs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmdit_models import T5_LENGTH, build_flux, build_sd3

from attnctrl.errors import InvalidOptionError, InvalidWeightError, PromptMismatchError, UnsupportedModelError
from attnctrl.pipelines import FlowEditOutput, flow_edit



@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny(request, tokenizer, t5_tokenizer):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if request.param == "sd3":
        return build_sd3(tokenizer, t5_tokenizer, cls=StableDiffusion3Pipeline, layers=1)
    return build_flux(tokenizer, t5_tokenizer, cls=FluxPipeline, double=1, single=1)


@pytest.fixture(scope="module")
def shapes_flow():
    from diffusers import DiffusionPipeline

    from attnctrl.models import SHAPES_FLOW

    pipe = DiffusionPipeline.from_pretrained(SHAPES_FLOW)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)


def _round_trip(pipe, image) -> np.ndarray:
    """The image through the pipeline's VAE (posterior mode), as flow_edit encodes and decodes it."""
    from attnctrl.images import load_image

    pixels = load_image(image, height=image.shape[0], width=image.shape[1])[None] * 2 - 1 if isinstance(image, np.ndarray) else None
    if pixels is None:
        pixels = load_image(image)[None] * 2 - 1
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample
    return pipe.image_processor.postprocess(decoded, output_type="np")[0]


def _psnr(a, b, where=None) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = (a - b) ** 2 if where is None else ((a - b) ** 2)[where]
    return float(10 * np.log10(1.0 / max(diff.mean(), 1e-12)))


KW = dict(num_inference_steps=6, n_max=4, height=32, width=32, max_sequence_length=T5_LENGTH, progress=False, output_type="np")


def test_identical_prompts_and_guidance_give_the_vae_round_trip(tiny):
    image = _image()
    out = flow_edit(tiny, image, "a red cat", "a red cat", source_guidance_scale=3.0, target_guidance_scale=3.0, **KW)
    assert isinstance(out, FlowEditOutput)
    np.testing.assert_allclose(out.images[0], _round_trip(tiny, image), atol=1e-4)


def test_evaluation_counts_and_settings(tiny):
    sd3 = tiny.transformer.config.get("guidance_embeds") is None
    per_row = 4 if sd3 else 2  # SD3: source/target x uncond/cond; Flux: source, target
    images = [_image(0), _image(1)]
    out = flow_edit(tiny, images, "a red cat", ["a blue cat", "a green cat"], n_avg=2, **KW)
    assert len(out.images) == 2 and out.images[0].shape == (32, 32, 3)
    assert out.transformer_evaluations == per_row * 2 * 2 * 4
    out = flow_edit(tiny, images[0], "a red cat", "a blue cat", n_min=1, **KW)
    assert out.transformer_evaluations == per_row * 3 + per_row // 2 * 1
    assert (out.num_inference_steps, out.n_max, out.n_min, out.size) == (6, 4, 1, (32, 32))
    assert out.seconds >= 0


def test_defaults_are_the_papers(tiny):
    from attnctrl.pipelines.flow_edit import flow_edit_defaults

    expected = (50, 33, 3.5, 13.5) if tiny.transformer.config.get("guidance_embeds") is None else (28, 24, 1.5, 5.5)
    d = flow_edit_defaults(tiny)
    assert (d["num_inference_steps"], d["n_max"], d["source_guidance_scale"], d["target_guidance_scale"]) == expected


def test_deterministic_per_seed(tiny):
    image = _image()
    a = flow_edit(tiny, image, "a red cat", "a blue dog", seed=3, **KW).images[0]
    b = flow_edit(tiny, image, "a red cat", "a blue dog", seed=3, **KW).images[0]
    c = flow_edit(tiny, image, "a red cat", "a blue dog", seed=4, **KW).images[0]
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(n_max=7), InvalidOptionError),
        (dict(n_max=0), InvalidOptionError),
        (dict(n_min=4), InvalidOptionError),
        (dict(n_min=-1), InvalidOptionError),
        (dict(n_avg=0), InvalidOptionError),
        (dict(num_inference_steps=0), InvalidOptionError),
        (dict(source_guidance_scale=float("nan")), InvalidWeightError),
        (dict(target_guidance_scale=float("inf")), InvalidWeightError),
        (dict(output_type="jpeg"), InvalidOptionError),
    ],
)
def test_argument_errors(tiny, kwargs, error):
    options = dict(KW, **kwargs)
    with pytest.raises(error):
        flow_edit(tiny, _image(), "a red cat", "a blue cat", **options)


def test_prompt_errors(tiny):
    with pytest.raises(PromptMismatchError, match="empty"):
        flow_edit(tiny, _image(), "a red cat", "  ", **KW)
    with pytest.raises(PromptMismatchError, match="per image"):
        flow_edit(tiny, [_image(0), _image(1)], "a red cat", ["a", "b", "c"], **KW)


def test_unet_pipeline_is_refused(sd_pipe):
    with pytest.raises(UnsupportedModelError, match="SD3"):
        flow_edit(sd_pipe, _image(), "a red cat", "a blue cat", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(tokenizer, t5_tokenizer, dtype):
    from diffusers import StableDiffusion3Pipeline

    pipe = build_sd3(tokenizer, t5_tokenizer, cls=StableDiffusion3Pipeline, layers=1).to(dtype=dtype)
    out = flow_edit(pipe, _image(), "a red cat", "a blue cat", **dict(KW, output_type="latent"))
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()
    full = build_sd3(tokenizer, t5_tokenizer, cls=StableDiffusion3Pipeline, layers=1)
    ref = flow_edit(full, _image(), "a red cat", "a blue cat", **dict(KW, output_type="latent")).images
    assert (out.images - ref).abs().max() < 0.25 * ref.abs().max()


def test_prompt2prompt_subclass_works(tokenizer, t5_tokenizer):
    pipe = build_sd3(tokenizer, t5_tokenizer, layers=1)  # Prompt2PromptSD3Pipeline
    out = flow_edit(pipe, _image(), "a red cat", "a blue cat", **KW)
    assert out.images[0].shape == (32, 32, 3)


def test_shapes_flow_identity_and_colour_edit(shapes_flow):
    from attnctrl.models.shapes import analyze, object_extent

    pipe = shapes_flow
    source = pipe(["a red circle on the left"], num_inference_steps=20, guidance_scale=4.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    src_u8 = (source * 255).round().astype(np.uint8)
    found = analyze(src_u8)
    assert found and found[0].colour == "red"
    # identical prompts at equal guidance: the velocities cancel, the image is the VAE round trip
    same = flow_edit(pipe, source, "a red circle on the left", "a red circle on the left", num_inference_steps=20, n_max=14,
                     source_guidance_scale=3.5, target_guidance_scale=3.5, progress=False, output_type="np").images[0]
    trip = _round_trip(pipe, source)
    assert np.abs(same - trip).max() < 1e-4
    # a colour edit: the object turns blue, the background stays close
    out = flow_edit(pipe, source, "a red circle on the left", "a blue circle on the left", num_inference_steps=20, n_max=14,
                    source_guidance_scale=1.5, target_guidance_scale=6.0, progress=False, output_type="np")
    edited = out.images[0]
    edited_found = analyze((edited * 255).round().astype(np.uint8))
    assert edited_found and edited_found[0].colour == "blue"
    region = object_extent(src_u8, found[0]) | object_extent((edited * 255).round().astype(np.uint8), edited_found[0])
    region = torch.nn.functional.max_pool2d(torch.from_numpy(region)[None, None].float(), 5, 1, 2)[0, 0].numpy() > 0
    background = _psnr(edited, trip, ~region)
    inside = _psnr(edited, trip, region)
    assert background > inside + 8, (background, inside)
    assert background > 26, background


@pytest.fixture(scope="module")
def red_circle(tmp_path_factory, shapes_flow):
    path = tmp_path_factory.mktemp("fe") / "red.png"
    shapes_flow(["a red circle on the left"], num_inference_steps=20, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0)).images[0].save(path)
    return path


def test_cli_flow_edit(red_circle, tmp_path, capsys):
    from PIL import Image

    from attnctrl.cli import main
    from attnctrl.models.shapes import analyze

    out = tmp_path / "out"
    code = main(["flow-edit", "--image", str(red_circle), "--prompt", "a red circle on the left", "--to",
                 "a blue circle on the left", "--steps", "20", "--n-max", "14", "--source-guidance", "1.5",
                 "--target-guidance", "6", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["command"] == "flow-edit" and record["n_max"] == 14 and record["edits"][0]["transformer_evaluations"] == 14 * 4
    assert analyze(Image.open(out / "edit_1.png"))[0].colour == "blue"
    assert (out / "source.png").is_file() and (out / "grid.png").is_file()
    # errors: n_max past the steps (exit 2, one line), a UNet model refused with the command to use
    assert main(["flow-edit", "--image", str(red_circle), "--prompt", "a", "--to", "b", "--steps", "5", "--n-max", "9",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "n_max" in capsys.readouterr().err
    from attnctrl.models import SHAPES

    assert main(["flow-edit", "--model", SHAPES, "--image", str(red_circle), "--prompt", "a", "--to", "b",
                 "--out", str(tmp_path / "unet")]) == 2
    assert "attnctrl edit --image" in capsys.readouterr().err


def test_batch_flow_edit(red_circle, tmp_path):
    from attnctrl.cli.batch import BatchFileError, load_jobs, run_batch

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "fe", "kind": "flow-edit", "image": str(red_circle), "prompt": "a red circle on the left",
                                "to": ["a blue circle on the left"], "steps": 10, "n_max": 7, "source_guidance": 1.5,
                                "target_guidance": 6}) + "\n")
    assert run_batch(str(jobs), str(tmp_path / "out"), progress=False) == 0
    assert (tmp_path / "out" / "fe" / "edit_1.png").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "kind": "flow-edit", "image": str(red_circle), "prompt": "a", "to": "b",
                               "steps": 4, "n_max": 6}) + "\n")
    with pytest.raises(BatchFileError, match="n_max"):
        load_jobs(str(bad))
    bad.write_text(json.dumps({"id": "x", "kind": "flow-edit", "image": str(red_circle), "prompt": "a", "to": "b",
                               "guidance": 3}) + "\n")
    with pytest.raises(BatchFileError, match="guidance"):
        load_jobs(str(bad))


def test_app_real_image_flow_edit(red_circle, shapes_flow, sd_pipe):
    pytest.importorskip("gradio")
    from attnctrl.app import actions
    from attnctrl.app.models import LoadedModel
    from attnctrl.app.options import OptionError
    from attnctrl.models.shapes import analyze

    flow = LoadedModel(model="shapes-flow", device="cpu", dtype=torch.float32, pipe=shapes_flow)
    images, summary = actions.run_flow_edit(flow, str(red_circle), "a red circle on the left", "a blue circle on the left",
                                            steps=20, n_max=14, source_guidance=1.5, target_guidance=6.0, seed=0)
    assert len(images) == 2 and analyze(images[1])[0].colour == "blue"
    assert "56 transformer evaluations" in summary
    unet = LoadedModel(model="tiny", device="cpu", dtype=torch.float32, pipe=sd_pipe)
    with pytest.raises(OptionError, match="UNet model"):
        actions.run_flow_edit(unet, str(red_circle), "a", "b", steps=None, n_max=None, source_guidance=None,
                              target_guidance=None, seed=0)
    with pytest.raises(OptionError, match="Target prompt"):
        actions.run_flow_edit(flow, str(red_circle), "a red circle", " ", steps=None, n_max=None, source_guidance=None,
                              target_guidance=None, seed=0)


def test_app_builds_with_the_flow_edit_section():
    pytest.importorskip("gradio")
    from attnctrl.app.ui import build_app

    demo = build_app()
    config = json.dumps(demo.config, default=str)
    assert "real-fe-run" in config and "real-fe-blend" in config and "real-fe-blend-threshold" in config


def test_cli_help_examples_parse(capsys):
    import shlex

    from attnctrl.cli import commands

    parser = commands.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["flow-edit", "--help"])
    shown = capsys.readouterr().out
    assert "examples:\n  attnctrl flow-edit" in shown and "n_max 33" in shown
    for line in commands.EXAMPLES["flow-edit"]:
        assert line in shown
        assert parser.parse_args(shlex.split(line)[1:]).command == "flow-edit"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_schedule_is_the_pipelines_own(tokenizer, t5_tokenizer, family):
    """The sigmas FlowEdit walks are those the stock pipeline samples with (SD3's shift; Flux's
    resolution-dependent mu under dynamic shifting), and the pipeline's scheduler is left alone."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from attnctrl.pipelines.flow_edit import _sigmas

    if family == "sd3":
        pipe = build_sd3(tokenizer, t5_tokenizer, cls=StableDiffusion3Pipeline, layers=1)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        seq_len = 64
    else:
        pipe = build_flux(tokenizer, t5_tokenizer, cls=FluxPipeline, double=1, single=1)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        seq_len = 64
    pipe("a red cat", num_inference_steps=7, height=32, width=32, max_sequence_length=T5_LENGTH, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    stock = pipe.scheduler.sigmas.clone()
    _, sigmas = _sigmas(pipe, family, 7, seq_len, "cpu")
    torch.testing.assert_close(sigmas, stock.float(), atol=1e-6, rtol=0)
    flow_edit(pipe, _image(), "a red cat", "a blue cat", num_inference_steps=5, n_max=3, height=32, width=32,
              max_sequence_length=T5_LENGTH, progress=False)
    torch.testing.assert_close(pipe.scheduler.sigmas, stock)


# -- LocalBlend ------------------------------------------------------------------------------------

def _processor_types(pipe) -> list[str]:
    return [type(p).__name__ for p in pipe.transformer.attn_processors.values()]


def test_blend_keeps_the_image_latent_outside_the_mask(tiny):
    """Outside the LocalBlend mask the edited latent is the image's latent exactly (a blend that
    passes nothing gives that latent: the identity edit's); inside it moves; the stock processors
    are back afterwards."""
    from attnctrl import LocalBlend

    stock = _processor_types(tiny)
    image = _image(2)
    options = dict(KW, output_type="latent")
    # threshold 1: nothing passes the normalised maps' strict threshold, the latent is the image's
    none = flow_edit(tiny, image, "a red cat", "a blue cat", blend=LocalBlend(["cat", "cat"], threshold=1.0), **options)
    assert none.blend_masks.max() == 0
    same = flow_edit(tiny, image, "a red cat", "a red cat", source_guidance_scale=3.0, target_guidance_scale=3.0, **options).images
    torch.testing.assert_close(none.images, same, atol=1e-5, rtol=0)
    source = none.images
    out = flow_edit(tiny, image, "a red cat", "a blue cat", blend=LocalBlend(["cat", "cat"], threshold=0.95), **options)
    assert _processor_types(tiny) == stock
    masks = out.blend_masks
    assert masks.shape == (1, 1, *out.images.shape[-2:]) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks.min() == 0 and masks.max() == 1  # the tiny model's maps are not flat
    keep = (masks == 0).expand_as(out.images)
    torch.testing.assert_close(out.images[keep], source[keep], atol=0, rtol=0)
    assert (out.images[~keep] - source[~keep]).abs().max() > 1e-3
    plain = flow_edit(tiny, image, "a red cat", "a blue cat", **options)
    assert plain.blend_masks is None
    assert (plain.images[keep] - source[keep]).abs().max() > 1e-3  # without the blend the outside moves too


def test_blend_refusals(tiny):
    from attnctrl import LocalBlend
    from attnctrl.errors import InvalidTypeError

    stock = _processor_types(tiny)
    blend = LocalBlend(["cat", "dog"])
    with pytest.raises(InvalidTypeError, match="LocalBlend"):
        flow_edit(tiny, _image(), "a red cat", "a blue dog", blend=["cat", "dog"], **KW)
    with pytest.raises(PromptMismatchError, match="one source and one target"):
        flow_edit(tiny, [_image(0), _image(1)], "a red cat", ["a blue dog", "a green dog"], blend=blend, **KW)
    with pytest.raises(InvalidOptionError, match="n_min=0"):
        flow_edit(tiny, _image(), "a red cat", "a blue dog", blend=blend, n_min=1, **KW)
    from attnctrl.errors import WordNotFoundError

    with pytest.raises(WordNotFoundError, match="tiger"):  # a blend word missing from the prompts, named
        flow_edit(tiny, _image(), "a red cat", "a blue dog", blend=LocalBlend(["cat", "tiger"]), **KW)
    if tiny.transformer.config.get("guidance_embeds") is not None:
        with pytest.raises(InvalidOptionError, match="n_avg=1"):
            flow_edit(tiny, _image(), "a red cat", "a blue dog", blend=blend, n_avg=2, **KW)
    else:  # SD3: averaged noise draws are ordinary guided calls at one timestep
        out = flow_edit(tiny, _image(), "a red cat", "a blue dog", blend=blend, n_avg=2, **KW)
        assert out.blend_masks.shape[0] == 1
    assert _processor_types(tiny) == stock


def test_blend_two_images_one_prompt_pair(tiny):
    from attnctrl import LocalBlend

    out = flow_edit(tiny, [_image(0), _image(1)], "a red cat", "a blue cat", blend=LocalBlend(["cat", "cat"], threshold=0.95),
                    **dict(KW, output_type="latent"))
    assert out.images.shape[0] == 2 and out.blend_masks.shape[0] == 2
    assert not torch.equal(out.blend_masks[0], out.blend_masks[1])  # each image's own region


def test_cli_batch_and_app_flow_edit_with_blend(red_circle, shapes_flow, tmp_path, capsys):
    """--blend / "blend" / the app's blend box reach flow_edit: the mask is written and recorded,
    and outside it the edit is the image's latent (so the background is the VAE round trip's)."""
    from PIL import Image

    from attnctrl.cli import main
    from attnctrl.cli.batch import BatchFileError, load_jobs, run_batch

    out = tmp_path / "cli"
    argv = ["flow-edit", "--image", str(red_circle), "--prompt", "a red circle on the left", "--to", "a blue circle on the left",
            "--steps", "10", "--n-max", "7", "--source-guidance", "1.5", "--target-guidance", "6", "--blend", "red,blue",
            "--blend", "circle", "--blend-threshold", "0.7", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads((out / "run.json").read_text())
    assert record["blend"] == [["red", "circle"], ["blue", "circle"]] and record["blend_threshold"] == 0.7
    area = record["edits"][0]["blend_area"]
    mask = np.asarray(Image.open(out / "mask_1.png")) > 127
    assert 0 < area < 1 and abs(mask.mean() - area) < 0.02
    bad = ["flow-edit", "--image", str(red_circle), "--prompt", "a red circle", "--to", "a blue circle", "--out", str(tmp_path / "x")]
    assert main(bad + ["--blend", "red,blue,green"]) == 2 and "one per prompt" in capsys.readouterr().err
    assert main(bad + ["--blend", "circle", "--n-min", "1", "--n-max", "5", "--steps", "8"]) == 2
    assert "--n-min 0" in capsys.readouterr().err
    assert main(bad + ["--blend", "square"]) == 2 and "square" in capsys.readouterr().err
    assert main(bad + ["--blend-threshold", "0.5"]) == 2 and "needs --blend" in capsys.readouterr().err
    assert main(bad + ["--blend", "circle", "--blend-threshold", "2"]) == 2 and "[0, 1]" in capsys.readouterr().err

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "fe", "kind": "flow-edit", "image": str(red_circle), "prompt": "a red circle on the left",
                                "to": "a blue circle on the left", "steps": 10, "n_max": 7, "source_guidance": 1.5,
                                "target_guidance": 6, "blend": ["circle"], "blend_threshold": 0.7}) + "\n")
    assert run_batch(str(jobs), str(tmp_path / "out"), progress=False) == 0
    batch_mask = np.asarray(Image.open(tmp_path / "out" / "fe" / "mask_1.png")) > 127
    assert 0 < batch_mask.mean() < 1
    for fields, message in (({"blend": ["square"]}, "square"), ({"blend": "circle"}, "list of words"),
                            ({"blend_threshold": 0.5}, "needs"), ({"blend": ["circle"], "blend_threshold": -1}, r"\[0, 1\]")):
        jobs.write_text(json.dumps({"id": "x", "kind": "flow-edit", "image": str(red_circle), "prompt": "a red circle",
                                    "to": "a blue circle", **fields}) + "\n")
        with pytest.raises(BatchFileError, match=message):
            load_jobs(str(jobs))

    pytest.importorskip("gradio")
    from attnctrl.app import actions
    from attnctrl.app.models import LoadedModel

    flow = LoadedModel(model="shapes-flow", device="cpu", dtype=torch.float32, pipe=shapes_flow)
    images, summary = actions.run_flow_edit(flow, str(red_circle), "a red circle on the left", "a blue circle on the left",
                                            steps=10, n_max=7, source_guidance=1.5, target_guidance=6.0, seed=0,
                                            blend=[["circle"], ["circle"]], blend_threshold=0.7)
    assert len(images) == 3 and "LocalBlend on circle / circle" in summary
