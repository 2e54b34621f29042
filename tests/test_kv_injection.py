"""K/V injection (MasaCtrl's mutual self-attention) on UNets: the layer-level rule, layer and step
selection, the pipelines and the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import attnctrl
from attnctrl import KVInjection, LocalBlend, Replace
from attnctrl.controller import EditController
from attnctrl.errors import InvalidScheduleError, InvalidTypeError
from attnctrl.kernels import reference_attention
from attnctrl.plan import compile_edit

STEPS = 10
PROMPTS = ["a cat sitting on the grass", "a cat running on the street"]


def probe(tokenizer, edit, *, step, layer, num_layers=16, prompts=PROMPTS):
    """One CFG self-attention call (4 rows: uncond src/edit, cond src/edit) at ``layer``."""
    plan = compile_edit(edit, tokenizer, prompts)
    ctl = EditController(plan.prompts, plan, record=False)
    ctl.latent_hw = (16, 16)
    ctl.num_self_layers = num_layers
    ctl.clock.tick(None, step=step, num_steps=STEPS)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 64, 8, generator=g, dtype=torch.float64) for _ in range(3))
    return ctl.attention(q, k, v, is_cross=False, layer=layer), (q, k, v)


def test_edited_rows_read_the_source_keys_and_values(tokenizer):
    out, (q, k, v) = probe(tokenizer, KVInjection(steps=(0.0, 1.0), layers=0.0), step=3, layer=0)
    source_kv = torch.tensor([0, 0, 2, 2])  # uncond edit <- uncond source, cond edit <- cond source
    expected, _ = reference_attention(q, k[source_kv], v[source_kv])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    plain, _ = reference_attention(q, k, v)
    torch.testing.assert_close(out[[0, 2]], plain[[0, 2]], rtol=0, atol=1e-12)  # source rows untouched
    assert not torch.allclose(out[3], plain[3])


@pytest.mark.parametrize("layers,layer,active", [
    (10 / 16, 9, False), (10 / 16, 10, True), (10 / 16, 15, True),  # MasaCtrl: layers 10..15 of 16
    (12, 11, False), (12, 12, True), ((3, 7), 7, True), ((3, 7), 4, False), (0.0, 0, True), (1.0, 15, False),
])
def test_layer_selection(tokenizer, layers, layer, active):
    out, (q, k, v) = probe(tokenizer, KVInjection(steps=(0.0, 1.0), layers=layers), step=0, layer=layer)
    plain, _ = reference_attention(q, k, v)
    assert torch.allclose(out, plain, atol=1e-12) is (not active)


def test_step_window_and_defaults(tokenizer):
    edit = KVInjection()  # MasaCtrl: from step 4 of 50 (0.08), layers 10.. of 16
    assert edit.steps == (0.08, 1.0) and edit.layer_selected(10, 16) and not edit.layer_selected(9, 16)
    assert edit.layer_selected(44, 70) and not edit.layer_selected(43, 70)  # SDXL: MasaCtrl's 44 of 70
    window = KVInjection(steps=(0.3, 0.6), layers=0.0)
    for step, active in ((2, False), (3, True), (5, True), (6, False)):
        out, (q, k, v) = probe(tokenizer, window, step=step, layer=0)
        plain, _ = reference_attention(q, k, v)
        assert torch.allclose(out, plain, atol=1e-12) is (not active), step
    out, (q, k, v) = probe(tokenizer, KVInjection(steps=(0.0, 1.0), layers=0.0), step=0, layer=None)
    torch.testing.assert_close(out, reference_attention(q, k, v)[0])  # a layer of unknown index never injects


def test_injection_takes_precedence_over_self_replacement(tokenizer):
    prompts = ["a cat on the grass", "a dog on the grass"]
    edit = KVInjection(steps=(0.0, 1.0), layers=0.0, base=Replace(self_steps=1.0))
    out, (q, k, v) = probe(tokenizer, edit, step=0, layer=0, prompts=prompts)
    expected, _ = reference_attention(q, k[[0, 0, 2, 2]], v[[0, 0, 2, 2]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_bad_options():
    for bad in (-1, 1.5, (), ("a",), True, "late"):
        with pytest.raises(InvalidScheduleError):
            KVInjection(layers=bad)
    with pytest.raises(InvalidScheduleError):
        KVInjection(steps=(0.6, 0.2))
    with pytest.raises(InvalidTypeError):
        KVInjection(base=LocalBlend(["cat"]))
    assert KVInjection(layers=[5, 3, 5]).layers == (3, 5)


def test_pipeline_source_row_is_untouched_and_an_empty_window_is_identity(sd_pipe):
    """KV injection leaves the source row equal to its stock generation; with an empty window the
    edited row equals a plain generation of its own prompt; inside the window it changes."""
    common = dict(num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0))
    stock = [sd_pipe([p], edit=None, **dict(common, generator=torch.Generator().manual_seed(0))).images[0] for p in PROMPTS]
    injected = sd_pipe(PROMPTS, edit=KVInjection(steps=(0.0, 1.0), layers=0.0), **common).images
    torch.testing.assert_close(injected[0], stock[0], rtol=0, atol=1e-4)  # batch-size-dependent CPU kernels
    assert (injected[1] - stock[1]).abs().max() > 1e-3
    common["generator"] = torch.Generator().manual_seed(0)
    idle = sd_pipe(PROMPTS, edit=KVInjection(steps=(1.0, 1.0)), **common).images
    torch.testing.assert_close(idle[1], stock[1], rtol=0, atol=1e-4)


def test_chained_with_a_word_edit_on_sdxl(sdxl_pipe):
    out = sdxl_pipe(["a cat on the grass", "a dog on the grass"],
                    edit=KVInjection(steps=(0.0, 1.0), base=Replace(blend=LocalBlend(("cat", "dog")))),
                    num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images).all() and out.attention is not None


def test_control_on_a_stock_pipeline_counts_self_attention_layers(sd_pipe):
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline(**sd_pipe.components)
    stock.set_progress_bar_config(disable=True)
    with attnctrl.control(stock, KVInjection(steps=(0.0, 1.0)), PROMPTS) as session:
        assert session.controller.num_self_layers == 7  # the tiny UNet: 2 down, 1 mid, 4 up
        out = stock(PROMPTS, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images).all()


def test_cli_kv_modes(tmp_path, capsys):
    from attnctrl.cli import main

    out = tmp_path / "kv"
    code = main(["edit", "--prompt", "a red circle on the left", "--to", "a red square in the centre", "--mode", "kv",
                 "--kv-steps", "0.1,1", "--kv-layers", "0.5", "--steps", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["edit"]["type"] == "KVInjection" and run["edit"]["layers"] == 0.5 and run["edit"]["base"] is None
    out2 = tmp_path / "kv2"
    code = main(["edit", "--prompt", "a red circle on the left", "--to", "a blue circle on the left", "--kv-layers", "3,4",
                 "--blend", "circle", "--steps", "3", "--out", str(out2)])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out2 / "run.json").read_text())
    assert run["edit"]["layers"] == [3, 4] and run["edit"]["base"]["type"] == "Replace"
    assert main(["edit", "--prompt", "a red circle", "--to", "a red square", "--mode", "kv", "--weight", "red=2",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "no word edit" in capsys.readouterr().err
    assert main(["edit", "--prompt", "a red circle", "--to", "a blue circle", "--kv-layers", "x",
                 "--out", str(tmp_path / "bad2")]) == 2


# ---- the mask-guided variant -------------------------------------------------------------------
def test_mask_guided_rule_at_one_layer(tokenizer):
    """With subject masks, edited queries on the subject attend to the source's subject keys only,
    the other queries to its background keys; source rows are untouched."""
    from attnctrl.p2p import RowLayout, edited_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 2, 16, 8, generator=g, dtype=torch.float64) for _ in range(3))
    subject = torch.zeros(4, 16, dtype=torch.bool)
    subject[:, :6] = True  # keys/queries 0..5 are the subject in every row
    edited = torch.tensor([False, True, False, True])
    keys_on = (subject | ~edited[:, None])[:, None, None, :]
    keys_off = (~subject | ~edited[:, None])[:, None, None, :]
    queries_on = (subject | ~edited[:, None])[:, None, :, None]
    out, _ = edited_attention(q, k, v, layout=RowLayout.from_batch(4, 2), inject_kv=True,
                              kv_masks=(keys_on, keys_off, queries_on))
    src = torch.tensor([0, 0, 2, 2])
    ks, vs = k[src], v[src]
    on, _ = reference_attention(q, ks, vs, mask=subject[:, None, None, :])
    off, _ = reference_attention(q, ks, vs, mask=~subject[:, None, None, :])
    expected = torch.where(subject[:, None, :, None], on, off)
    torch.testing.assert_close(out[[1, 3]], expected[[1, 3]], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[[0, 2]], reference_attention(q, k, v)[0][[0, 2]], rtol=0, atol=1e-12)


def test_mask_guided_pipeline_runs_and_needs_the_words(sd_pipe):
    from attnctrl.errors import WordNotFoundError

    edit = KVInjection(steps=(0.3, 1.0), layers=0.0, mask_words=("cat", "cat"))
    out = sd_pipe(PROMPTS, edit=edit, num_inference_steps=4, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    plain = sd_pipe(PROMPTS, edit=KVInjection(steps=(0.3, 1.0), layers=0.0), num_inference_steps=4,
                    output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.images).all()
    torch.testing.assert_close(out.images[0], plain.images[0])  # the source row is the same
    assert (out.images[1] - plain.images[1]).abs().max() > 1e-4  # the masks change the edited row
    with pytest.raises(WordNotFoundError):
        sd_pipe(PROMPTS, edit=KVInjection(mask_words=("cat", "dog")), num_inference_steps=2, output_type="latent")
    for bad in (("cat",), "cat", ("cat", "")):
        with pytest.raises(attnctrl.errors.InvalidWeightError):
            KVInjection(mask_words=bad)


def test_cli_kv_mask(tmp_path, capsys):
    from attnctrl.cli import main

    out = tmp_path / "mask"
    code = main(["edit", "--prompt", "a red circle on the left", "--to", "a red circle in the centre", "--mode", "kv",
                 "--kv-mask", "circle", "--kv-steps", "0.3,1", "--steps", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["edit"]["mask_words"] == ["circle", "circle"]
    assert main(["edit", "--prompt", "a red circle", "--to", "a red square", "--kv-mask", "a,b,c",
                 "--out", str(tmp_path / "bad")]) == 2
