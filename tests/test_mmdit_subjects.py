"""IR-Diffusion consistent subjects on MM-DiTs: ConsistentSubjectsSD3Pipeline / ConsistentSubjectsFluxPipeline."""

from __future__ import annotations

import pytest
import torch

from attnctrl.consistency import IRDiffusion, query_dropout
from attnctrl.errors import InvalidOptionError, WordNotFoundError
from attnctrl.kernels import reference_attention
from attnctrl.pipelines.consistency import Subject
from attnctrl.pipelines.mmdit_subjects import ConsistentSubjectsFluxPipeline, ConsistentSubjectsSD3Pipeline, reference_joint_routing

from mmdit_models import build_flux, build_sd3

torch.set_num_threads(1)

SUBJECTS = [Subject("cat", "a photo of a cat", "cat"), Subject("dog", "a photo of a dog", "dog")]
SCENES = ["a cat and a dog on the grass", "a car on the street"]



@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request, tokenizer, t5_tokenizer):
    if request.param == "sd3":
        return build_sd3(tokenizer, t5_tokenizer, cls=ConsistentSubjectsSD3Pipeline)
    return build_flux(tokenizer, t5_tokenizer, cls=ConsistentSubjectsFluxPipeline)


def test_reference_routing_against_dense_mask():
    """Scene image queries: isolation among the scene's subjects, a kept subject-i query also sees
    portrait i's (moved) subject tokens, every query sees the scene's text; nothing else of the portraits."""
    n, tokens, text = 2, 10, 3
    labels = torch.tensor([0, 1, 1, 1, 0, 2, 2, 0, 0, 1])
    dropped = query_dropout(labels, n, 0.5, torch.Generator().manual_seed(0))
    inside = torch.zeros(n, tokens, dtype=torch.bool)
    inside[0, 2:6], inside[1, 6:9] = True, True
    routing = reference_joint_routing(dropped, labels, inside, isolate=True, reference_bias=0.0, text_tokens=text)
    g = torch.Generator().manual_seed(1)
    keys_total = n * tokens + tokens + text
    q = torch.randn(1, 2, tokens, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, keys_total, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, keys_total, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(tokens, keys_total, dtype=torch.bool)
    for a in range(tokens):
        own, kept = int(labels[a]), int(dropped[a]) == int(labels[a]) and int(labels[a]) > 0
        for i in range(n):
            if kept and own == i + 1:
                mask[a, i * tokens : (i + 1) * tokens] = inside[i]
        for b in range(tokens):
            other = int(labels[b])
            mask[a, n * tokens + b] = not (own and other and own != other)
        mask[a, n * tokens + tokens :] = True
    expected, _ = reference_attention(q, k, v, mask=mask)
    out, _ = reference_attention(q, k, v, mask=routing)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def _call(pipe, **kwargs):
    from diffusers import FluxPipeline

    settings = IRDiffusion(reposition="none" if isinstance(pipe, FluxPipeline) else "bbox", mutual_cross=0.0, dropout=0.5)
    kwargs.setdefault("settings", settings)
    return pipe(subjects=SUBJECTS, scenes=SCENES, num_inference_steps=2, height=32, width=32, max_sequence_length=12,
                generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)


def test_consistent_subjects_on_mmdit(pipe):
    out = _call(pipe)
    assert len(out.references) == 2 and len(out.scenes) == 2
    assert out.scene_subjects == [["cat", "dog"], []]
    assert set(out.scene_masks[0]) == {"cat", "dog"} and out.reference_masks.shape == (2, 8, 8)
    assert all(torch.isfinite(torch.as_tensor(s)).all() for s in out.scenes)
    boxes = _call(pipe, scene_masks=[[(0, 0, 16, 32), (16, 0, 32, 32)], None])  # caller's masks (pixels)
    assert boxes.scene_masks[0]["cat"][:, :4].all() and not boxes.scene_masks[0]["cat"][:, 4:].any()
    # the same noises with isolation and reference attention off: the scene changes only by them
    off = _call(pipe, settings=IRDiffusion(isolate=False, reference=False, reposition="none", mutual_cross=0.0))
    assert not torch.allclose(torch.as_tensor(out.scenes[0]), torch.as_tensor(off.scenes[0]), atol=1e-4)
    torch.testing.assert_close(torch.as_tensor(out.scenes[1]), torch.as_tensor(off.scenes[1]))  # no subject in it
    torch.testing.assert_close(out.references[0], off.references[0])


def test_mmdit_refusals(pipe):
    from diffusers import FluxPipeline

    with pytest.raises(InvalidOptionError, match="mutual_cross=0.0"):
        _call(pipe, settings=IRDiffusion())
    if isinstance(pipe, FluxPipeline):
        with pytest.raises(InvalidOptionError, match="reposition='none'"):
            _call(pipe, settings=IRDiffusion(mutual_cross=0.0))
    with pytest.raises(WordNotFoundError, match="horse"):
        pipe(subjects=[Subject("h", "a photo of a cat", "horse")], scenes=SCENES, num_inference_steps=1, max_sequence_length=12)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model_dir(request, tokenizer, t5_tokenizer, tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if request.param == "sd3":
        pipe = build_sd3(tokenizer, t5_tokenizer, cls=StableDiffusion3Pipeline, layers=1)
    else:
        pipe = build_flux(tokenizer, t5_tokenizer, cls=FluxPipeline, double=1, single=1)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    pipe.save_pretrained(path)
    return str(path), request.param


def test_cli_consistent_on_mmdit(model_dir, tmp_path, capsys):
    import json

    from attnctrl import cli

    path, family = model_dir
    out = tmp_path / "story"
    code = cli.main([
        "consistent", "--model", path, "--subject", 'cat="a photo of a cat"@cat', "--subject", 'dog="a photo of a dog"@dog',
        "--scene", "a cat and a dog on the grass", "--steps", "2", "--size", "32x32", "--out", str(out),
    ])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["scene_subjects"] == [["cat", "dog"]]
    assert (out / "scene_0.png").exists() and (out / "reference_cat_mask.png").exists()
    code = cli.main([
        "consistent", "--model", path, "--subject", 'cat="a photo of a cat"@cat', "--scene", "a cat on the grass",
        "--steps", "1", "--size", "32x32", "--out", str(tmp_path / "bad"), "--mutual-cross", "0.9",
    ])
    assert code != 0 and "mutual_cross" in capsys.readouterr().err


def test_app_consistency_tab_on_mmdit(model_dir):
    from attnctrl.app import actions
    from attnctrl.app.models import ModelCache

    path, _ = model_dir
    model = ModelCache(device="cpu", dtype="fp32").get(path)
    assert isinstance(model.consistent(), (ConsistentSubjectsSD3Pipeline, ConsistentSubjectsFluxPipeline))
    result = actions.run_consistent(
        model, [("cat", "a photo of a cat", "cat")], ["a cat on the grass"],
        settings=IRDiffusion(reposition="none", mutual_cross=0.0), seed=1, steps=1, guidance=3.5, size=(32, 32),
    )
    assert len(result.scenes) == 1 and len(result.references) == 1
