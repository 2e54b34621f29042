"""K/V injection (Stable Flow) on MM-DiTs: the rule at one layer, layer/step selection, the vital
preset, pipelines, chaining with a word edit, the CLI and the meta device."""

from __future__ import annotations

import pytest
import torch

import attnctrl
from attnctrl import ImageQK, KVInjection, LocalBlend, Refine, Replace
from attnctrl.errors import InvalidOptionError
from attnctrl.kernels.reference import softmax_probs
from attnctrl.mmdit import joint_edited_attention, kv_layers, structure_for
from attnctrl.p2p import RowLayout

from mmdit_models import T5_LENGTH, build_flux, build_sd3

PROMPTS = ["a photo of a cat on the grass", "a photo of a cat jumping on the grass"]
STEPS = 4



@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request, tokenizer, t5_tokenizer):
    if request.param == "sd3":
        return build_sd3(tokenizer, t5_tokenizer, dual=True)
    return build_flux(tokenizer, t5_tokenizer)


def noise(pipe, height=32, width=32, seed=5):
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, height // 2, width // 2, generator=g)
    return pipe._pack_latents(x, 1, 4, height // 2, width // 2) if isinstance(pipe, FluxPipeline) else x


def run(pipe, edit, prompts=PROMPTS, **kwargs):
    return pipe(
        prompts, edit=edit, height=32, width=32, num_inference_steps=STEPS, latents=noise(pipe),
        max_sequence_length=T5_LENGTH, output_type="latent", **kwargs,
    ).images


# ---- the rule at one layer -------------------------------------------------------------------------------
@pytest.mark.parametrize("text_first", [False, True])
def test_edited_rows_read_the_source_image_keys_and_values(text_first):
    """Every edited row (both halves of the guided batch) attends with its own queries to its
    source's image keys/values and its own text keys/values; source rows are untouched."""
    g = torch.Generator().manual_seed(0)
    layout = RowLayout.from_batch(4, 2, 1)  # [uncond src, uncond edit, cond src, cond edit]
    text_len, image_len = 5, 12
    q, k, v = (torch.randn(4, 2, text_len + image_len, 8, generator=g, dtype=torch.float64) for _ in range(3))
    text = slice(0, text_len) if text_first else slice(image_len, image_len + text_len)
    image = slice(text_len, text_len + image_len) if text_first else slice(0, image_len)
    out, _ = joint_edited_attention(q, k, v, layout=layout, text=text, image=image, inject_kv=True)
    for row, source in ((0, 0), (1, 0), (2, 2), (3, 2)):
        keys, values = k[row].clone(), v[row].clone()
        keys[:, image], values[:, image] = k[source][:, image], v[source][:, image]
        expected = softmax_probs(q[row:row + 1], keys[None], scale=8**-0.5, mask=None) @ values[None]
        assert torch.allclose(out[row:row + 1], expected, atol=1e-12), row
    # values only (feature sharing): own keys, the source's image values
    shared, _ = joint_edited_attention(q, k, v, layout=layout, text=text, image=image, inject_kv=True, inject_keys=False)
    for row, source in ((1, 0), (3, 2)):
        values = v[row].clone()
        values[:, image] = v[source][:, image]
        expected = softmax_probs(q[row:row + 1], k[row:row + 1], scale=8**-0.5, mask=None) @ values[None]
        assert torch.allclose(shared[row:row + 1], expected, atol=1e-12), row
    # precedence over the image q/k replacement, and the materialised reference agrees
    both, _ = joint_edited_attention(q, k, v, layout=layout, text=text, image=image, inject_kv=True, replace_qk=True)
    assert torch.equal(both, out)
    ref, _ = joint_edited_attention(q, k, v, layout=layout, text=text, image=image, inject_kv=True, materialise=True)
    assert torch.allclose(ref, out, atol=1e-12)


def test_layer_selection_and_vital_preset():
    layers = [f"transformer_blocks.{i}.attn.processor" for i in range(19)]
    layers += [f"single_transformer_blocks.{i}.attn.processor" for i in range(38)]
    vital = kv_layers(KVInjection(layers="vital"), layers)
    assert sorted(layers.index(name) for name in vital) == [0, 1, 17, 18, 19 + 6, 19 + 9, 19 + 34, 19 + 35, 19 + 37]
    assert KVInjection(layers="vital").steps == (0.0, 1.0)  # Stable Flow: every step
    assert KVInjection().steps == (0.08, 1.0)  # MasaCtrl
    assert kv_layers(KVInjection(layers=(2, 5)), layers) == {layers[2], layers[5]}
    assert kv_layers(KVInjection(layers=0.5), layers) == set(layers[28:])
    with pytest.raises(InvalidOptionError, match="19 double-stream \\+ 38 single-stream"):
        kv_layers(KVInjection(layers="vital"), layers[:3])
    with pytest.raises(InvalidOptionError, match="out of range"):
        kv_layers(KVInjection(layers=(60,)), layers)
    with pytest.raises(attnctrl.errors.InvalidScheduleError, match="'vital'"):
        KVInjection(layers="late")
    sharing = KVInjection.feature_sharing()
    assert sharing.share == "v" and sharing.steps == (0.0, 0.2)
    assert kv_layers(sharing, layers) == set(layers[19:])
    with pytest.raises(InvalidOptionError, match="single-stream"):
        kv_layers(sharing, layers[:19])
    with pytest.raises(InvalidOptionError, match="share"):
        KVInjection(share="k")


def test_structure_window_of_an_injection():
    assert structure_for(KVInjection(), None) == ImageQK(steps=0.0)  # no q/k pinning of the layout
    assert structure_for(KVInjection(), ImageQK(steps=0.3)) == ImageQK(steps=0.3)
    assert structure_for(KVInjection(base=Replace()), None) == ImageQK()  # the base edit's window


def test_unet_only_and_mmdit_only_options(tokenizer):
    from attnctrl.plan import compile_edit

    for layers in ("vital", "single"):
        with pytest.raises(InvalidOptionError, match="Flux blocks"):
            compile_edit(KVInjection(layers=layers), tokenizer, ["a cat", "a dog"])


# ---- pipelines -----------------------------------------------------------------------------------------------
def test_source_row_untouched_and_empty_window_is_identity(pipe):
    plain = run(pipe, None, attention_store=False)
    injected = run(pipe, KVInjection(steps=(0.0, 1.0), layers=0.0))
    assert torch.allclose(injected[0], plain[0], atol=1e-6)
    assert not torch.allclose(injected[1], plain[1], atol=1e-4)
    # a prompt injected with its own keys and values is its plain generation
    same = run(pipe, KVInjection(steps=(0.0, 1.0), layers=0.0), [PROMPTS[0], PROMPTS[0]])
    assert torch.allclose(same[1], plain[0], atol=1e-5)
    none = run(pipe, KVInjection(steps=(0.0, 0.0)))
    assert torch.allclose(none, plain, atol=1e-6)


def test_chained_with_a_word_edit_fused_equals_materialised(pipe):
    edit = KVInjection(steps=(0.0, 0.5), layers=(1,), base=Refine(blend=LocalBlend(["cat", "cat"])))
    pipe.to(torch.float64)
    try:
        fused = run(pipe, edit)
        ref = run(pipe, edit, materialise=True)
        without = run(pipe, edit.base)
    finally:
        pipe.to(torch.float32)
    assert (fused - ref).abs().max().item() <= 1e-9
    assert (fused[1] - without[1]).abs().max().item() > 1e-4


def test_feature_sharing_on_flux(tokenizer, t5_tokenizer):
    """Values-only sharing in Flux's single-stream blocks: the source row is untouched, the edited row
    changes, and with one prompt twice it is the plain generation."""
    flux = build_flux(tokenizer, t5_tokenizer)
    plain = run(flux, None, attention_store=False)
    shared = run(flux, KVInjection.feature_sharing(steps=(0.0, 1.0)))
    assert torch.allclose(shared[0], plain[0], atol=1e-6)
    assert not torch.allclose(shared[1], plain[1], atol=1e-4)
    full = run(flux, KVInjection(steps=(0.0, 1.0), layers="single"))
    assert not torch.allclose(full[1], shared[1], atol=1e-4)  # keys matter


def test_feature_sharing_from_an_rf_solver_inversion(tokenizer, t5_tokenizer):
    """RF-Solver-Edit as its paper runs it: invert with the second-order solver, then edit with the
    source's values shared in the single-stream blocks. The source row is the reconstruction, the
    shared values pull the edited row towards it (closer than the same edit without sharing), and
    one inversion serves both edits."""
    import numpy as np
    from PIL import Image

    from attnctrl.pipelines import invert, reconstruct

    flux = build_flux(tokenizer, t5_tokenizer)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    inv = invert(flux, image, PROMPTS[0], method="rf-solver", num_inference_steps=STEPS, height=32, width=32, progress=False)
    rec = reconstruct(flux, inv)
    prompts = [PROMPTS[0], "a photo of a dog on the grass"]
    shared = flux(prompts, edit=KVInjection.feature_sharing(steps=(0.0, 1.0), base=Replace()), inversion=inv, output_type="pt").images
    plain = flux(prompts, edit=Replace(), inversion=inv, output_type="pt").images
    assert torch.allclose(shared[0:1], rec, atol=1e-5) and torch.allclose(plain[0:1], rec, atol=1e-5)
    assert (shared[1] - rec[0]).abs().mean() < (plain[1] - rec[0]).abs().mean()


def test_values_only_on_a_unet(sd_pipe):
    prompts = ["a cat sitting on the grass", "a cat jumping on the grass"]
    kwargs = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent")
    both = sd_pipe(prompts, edit=KVInjection(steps=(0.0, 1.0), layers=0.0), **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(0)
    values = sd_pipe(prompts, edit=KVInjection(steps=(0.0, 1.0), layers=0.0, share="v"), **kwargs).images
    assert torch.allclose(both[0], values[0], atol=1e-6)
    assert not torch.allclose(both[1], values[1], atol=1e-4)


def test_refusals(pipe):
    with pytest.raises(InvalidOptionError, match="mask_words"):
        run(pipe, KVInjection(mask_words=("cat", "cat")))
    with pytest.raises(InvalidOptionError, match="vital"):
        run(pipe, KVInjection(layers="vital"))  # the tiny model is not Flux.1-deep
    with pytest.raises(InvalidOptionError, match="out of range"):
        run(pipe, KVInjection(layers=(40,)))


def test_control_on_a_stock_pipeline(pipe):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if isinstance(pipe, FluxPipeline) else StableDiffusion3Pipeline
    stock = cls(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    edit = KVInjection(steps=(0.0, 1.0), layers=(0, 1))
    latents = noise(pipe).expand(2, *noise(pipe).shape[1:])
    with attnctrl.control(stock, edit, PROMPTS, max_sequence_length=T5_LENGTH):
        ours = stock(PROMPTS, height=32, width=32, num_inference_steps=STEPS, latents=latents,
                     max_sequence_length=T5_LENGTH, output_type="latent").images
    assert torch.allclose(ours, run(pipe, edit), atol=1e-6)


def test_half_precision_on_cpu(pipe):
    for dtype in (torch.float16, torch.bfloat16):
        pipe.to(dtype)
        try:
            out = run(pipe, KVInjection(steps=(0.0, 1.0), layers=0.5, base=Refine()))
        finally:
            pipe.to(torch.float32)
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_cli_kv_on_mmdit(pipe, tmp_path, capsys):
    from attnctrl import cli

    path = tmp_path / "model"
    pipe.save_pretrained(path)
    out = tmp_path / "run"
    code = cli.main([
        "edit", "--model", str(path), "--steps", "2", "--size", "32x32", "--out", str(out),
        "--prompt", PROMPTS[0], "--to", PROMPTS[1], "--mode", "kv", "--kv-layers", "0,1", "--kv-steps", "0,1",
        "--kv-share", "v",
    ])
    assert code == 0, capsys.readouterr().err
    assert (out / "edit.png").exists() or any(out.glob("*.png"))
    code = cli.main([
        "edit", "--model", str(path), "--steps", "2", "--size", "32x32", "--out", str(tmp_path / "bad"),
        "--prompt", PROMPTS[0], "--to", PROMPTS[1], "--mode", "kv", "--kv-layers", "vital",
    ])
    assert code != 0 and "vital" in capsys.readouterr().err
