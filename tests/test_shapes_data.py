"""Fast tests of the shapes data generator, tokenizer and analyzer (no model needed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from attnctrl.models import SHAPES
from attnctrl.models.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    HELD_OUT_PAIRS,
    POSITIONS,
    SHAPE_KINDS,
    VOCABULARY,
    Scene,
    SceneObject,
    ShapesDataset,
    analyze,
    background_colour,
    caption,
    held_out_prompts,
    is_held_out,
    item,
    item_scene,
    object_extent,
    object_masks,
    render,
    sample_scene,
    with_article,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shapes_path_and_light_import():
    assert os.path.isabs(SHAPES) and SHAPES.endswith(os.path.join("shapes", "model"))
    # attnctrl.models / attnctrl.models.shapes add neither diffusers nor torch to what `import attnctrl` loads
    code = (
        "import sys, attnctrl; had_torch = 'torch' in sys.modules; "
        "import attnctrl.models, attnctrl.models.shapes; "
        "assert 'diffusers' not in sys.modules, 'diffusers imported'; "
        "assert had_torch or 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_items_are_deterministic():
    for i in (0, 1, 17, 999):
        a_img, a_txt = item(i, seed=3)
        b_img, b_txt = item(i, seed=3)
        assert a_txt == b_txt
        assert np.array_equal(np.asarray(a_img), np.asarray(b_img))
        assert a_img.size == (64, 64) and a_img.mode == "RGB"
    ds = ShapesDataset(seed=3, length=10)
    assert len(ds) == 10 and ds[5][1] == item(5, seed=3)[1]
    with pytest.raises(IndexError):
        ds[10]
    # different seeds give different data
    assert [item(i, seed=0)[1] for i in range(20)] != [item(i, seed=1)[1] for i in range(20)]


def test_articles():
    assert with_article("red circle") == "a red circle"
    assert with_article("orange star") == "an orange star"
    assert with_article("small orange star") == "a small orange star"


def _words(text: str) -> list[str]:
    return text.split()


def test_captions_grammar_and_background_rule():
    vocab = set(VOCABULARY)
    n_two = n_pos = n_center = n_no_bg = 0
    for i in range(1500):
        scene, text = item_scene(i, seed=0)
        words = _words(text)
        assert set(words) <= vocab, text
        for w, nxt in zip(words, words[1:]):
            if w == "a":
                assert nxt[0] not in "aeiou", text
            if w == "an":
                assert nxt[0] in "aeiou", text
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in text, text
        if scene.background != "white":
            assert re.search(rf"on a {'(gray|grey)' if scene.background == 'gray' else scene.background} background$", text), text
        if "background" not in text:
            n_no_bg += 1
            assert scene.background == "white", text
        n_two += len(scene.objects) == 2
        n_pos += any(p in text for p in POSITIONS) or "in the center" in text
        n_center += "center" in words
        if len(scene.objects) == 2:
            a, b = scene.objects
            assert a.position != b.position and a.colour != b.colour
            assert " and " in text
    assert 400 < n_two < 800
    assert n_pos > 900 and n_center > 10 and n_no_bg > 500


def test_caption_mentions_positions_when_asked():
    rng = np.random.default_rng(0)
    scene = Scene("black", (SceneObject("orange", "star", "at the bottom", "small"),))
    text = caption(scene, rng, position_prob=1.0, size_prob=0.0)
    assert text.endswith("an orange star at the bottom on a black background"), text


def test_held_out_never_in_training():
    pos_re = "|".join(re.escape(p) for p in list(POSITIONS) + ["in the center"])
    for i in range(4000):
        scene, text = item_scene(i, seed=0)
        assert not is_held_out(scene)
        for o in scene.objects:
            assert (o.colour, o.shape, o.position) not in set(HELD_OUT)
        for c, s, p in HELD_OUT:
            p_alias = "in the center" if p == "in the centre" else p
            for pp in {p, p_alias}:
                assert not re.search(rf"\b{c} {s} {re.escape(pp)}", text), text
        if len(scene.objects) == 2:
            pair = frozenset((o.colour, o.shape) for o in scene.objects)
            assert pair not in {frozenset(p) for p in HELD_OUT_PAIRS}
    assert pos_re  # keep the helper honest
    # but held-out scenes can be sampled for evaluation
    rng = np.random.default_rng(0)
    assert any(is_held_out(sample_scene(rng, allow_held_out=True)) for _ in range(3000))


def test_held_out_prompts():
    prompts = held_out_prompts()
    singles = [p for p in prompts if len(p.objects) == 1]
    doubles = [p for p in prompts if len(p.objects) == 2]
    assert len(singles) == len(HELD_OUT) and len(doubles) >= len(HELD_OUT_PAIRS)
    for p in prompts:
        for o in p.objects:
            assert o.colour in COLOURS and o.shape in SHAPE_KINDS
            assert o.position is None or o.position in POSITIONS
            assert f"{o.colour} {o.shape}" in p.prompt
    assert singles[0].prompt == "a red star on the left"
    assert held_out_prompts() == prompts  # fixed


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from attnctrl.models.shapes.tokenizer import build_tokenizer

    return build_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_tokenizer_vocab_words(tokenizer):
    from transformers import CLIPTokenizer

    from attnctrl.models.shapes.tokenizer import SPLIT_WORDS

    assert isinstance(tokenizer, CLIPTokenizer)
    assert tokenizer.model_max_length == 32
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|startoftext|>"
    for w in VOCABULARY:
        toks = tokenizer.tokenize(w)
        if w in SPLIT_WORDS:
            pieces = SPLIT_WORDS[w]
            assert toks == list(pieces[:-1]) + [pieces[-1] + "</w>"], (w, toks)
        else:
            assert toks == [w + "</w>"], (w, toks)
    assert tokenizer.tokenize("triangle") == ["tri", "angle</w>"]
    assert tokenizer.tokenize("purple") == ["pur", "ple</w>"]


def test_tokenizer_round_trip_and_any_text(tokenizer):
    for i in range(200):
        text = item(i, seed=5)[1]
        ids = tokenizer(text).input_ids
        assert len(ids) <= 32
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    odd = "Héllo, wörld! 123 ☃ zebra"
    ids = tokenizer(odd).input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    # CLIP's decode puts spaces between pre-tokenized pieces ("wörld !"); the characters survive
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == odd.lower().replace(" ", "")
    padded = tokenizer("a red circle", padding="max_length", max_length=32).input_ids
    assert len(padded) == 32 and padded[-1] == tokenizer.pad_token_id


def test_tokenizer_files_are_clip_layout(tmp_path):
    import json

    from attnctrl.models.shapes.tokenizer import bytes_to_unicode, write_vocab_files

    vpath, mpath = write_vocab_files(str(tmp_path))
    vocab = json.load(open(vpath, encoding="utf-8"))
    chars = list(bytes_to_unicode().values())
    assert len(chars) == 256
    for k, c in enumerate(chars):
        assert vocab[c] == k and vocab[c + "</w>"] == 256 + k
    assert max(vocab.values()) == len(vocab) - 1
    assert list(vocab)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert open(mpath, encoding="utf-8").readline().startswith("#version")


def test_shipped_tokenizer_matches(tokenizer):
    path = os.path.join(SHAPES, "tokenizer")
    if not os.path.isdir(path):
        pytest.skip("shapes model not trained yet")
    from transformers import CLIPTokenizer

    shipped = CLIPTokenizer.from_pretrained(path)
    for text in ("a purple triangle in the top left corner", "an orange star and a green circle"):
        assert shipped(text).input_ids == tokenizer(text).input_ids
    assert shipped.model_max_length == 32


# ------------------------------------------------------------------ analyze


@pytest.mark.parametrize("size", [64, 128])
def test_analyze_rendered_scenes(size):
    rng = np.random.default_rng(1234)
    n_two = 0
    for _ in range(50):
        scene = sample_scene(rng, allow_held_out=True, two_object_prob=0.5)
        img = render(scene, size)
        found = analyze(img)
        assert background_colour(img) == scene.background
        assert len(found) == len(scene.objects), (scene, found)
        expected = sorted((o.colour, o.position, o.size, o.shape) for o in scene.objects)
        got = sorted((d.colour, d.position, d.size, d.shape) for d in found)
        assert got == expected
        assert all(found[k].area >= found[k + 1].area for k in range(len(found) - 1))
        for d in found:
            assert d.mask.shape == (size, size) and d.mask.dtype == bool
            assert 0 < d.centroid[0] < 1 and 0 < d.centroid[1] < 1
        n_two += len(scene.objects) == 2
    assert n_two >= 15


def test_analyze_input_types():
    import torch

    scene = Scene("gray", (SceneObject("purple", "triangle", "in the top left corner"), SceneObject("yellow", "square", "on the right", "small")))
    img = render(scene)
    arr = np.asarray(img)
    ref = [(d.colour, d.position, d.area) for d in analyze(img)]
    t01 = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    variants = [arr, arr.astype(np.float32) / 255.0, t01, t01 * 2 - 1, t01[None]]
    for v in variants:
        assert [(d.colour, d.position, d.area) for d in analyze(v)] == ref
    assert [d.colour for d in analyze(img)] == ["purple", "yellow"]
    assert analyze(render(Scene("white", ()))) == []
    with pytest.raises(TypeError):
        analyze("not an image")


def _blurred(img, passes: int = 2) -> np.ndarray:
    """A soft edge like a VAE decode leaves: repeated 3x3 box blur."""
    arr = np.asarray(img, dtype=np.float32)
    for _ in range(passes):
        p = np.pad(arr, ((1, 1), (1, 1), (0, 0)), mode="edge")
        arr = sum(p[dy : dy + arr.shape[0], dx : dx + arr.shape[1]] for dy in range(3) for dx in range(3)) / 9.0
    return np.round(arr).astype(np.uint8)


def _mask_iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_object_extent_keeps_one_outline_across_colours():
    # The same blurred outline in yellow and in blue on white: analyze()'s palette masks end at a
    # fixed RGB distance, further in for yellow (close to white), so they disagree; the half-contrast
    # extents agree. This is what makes a colour swap's mask IoU measure the outline, not the colour.
    extent_ious, palette_ious = [], []
    for shape in SHAPE_KINDS:
        extents, palette = [], []
        for colour in ("yellow", "blue"):
            img = _blurred(render(Scene("white", (SceneObject(colour, shape, "in the centre", "small"),))))
            (found,) = analyze(img)
            extent = object_extent(img, found)
            assert found.mask.sum() <= extent.sum() and (found.mask <= extent).all()
            extents.append(extent)
            palette.append(found.mask)
        extent_ious.append(_mask_iou(*extents))
        palette_ious.append(_mask_iou(*palette))
    # Measured: extents 1.00 for every shape; palette masks 0.73 (circle) to 1.00 (square), mean 0.85.
    assert min(extent_ious) >= 0.95, extent_ious
    assert np.mean(palette_ious) < 0.9, palette_ious
    # On a sharp render the extent is the drawn object: half coverage of each pixel.
    scene = Scene("gray", (SceneObject("purple", "star", "on the left"), SceneObject("orange", "circle", "on the right")))
    img = render(scene)
    coverage = object_masks(scene, 64)
    for found in analyze(img):
        k = [o.colour for o in scene.objects].index(found.colour)
        assert _mask_iou(object_extent(img, found), coverage[k] >= 0.5) >= 0.9
    with pytest.raises(ValueError, match="analysed image"):
        object_extent(render(scene, 128), analyze(img)[0])


def test_background_palette_is_separable():
    pal = {**COLOURS, **BACKGROUNDS}
    names = list(pal)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.linalg.norm(np.subtract(pal[a], pal[b])) > 90, (a, b)


# ------------------------------------------------------------------ model folder / configs


def test_training_configs_are_consistent(tokenizer):
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig

    from attnctrl.models.shapes.train import scheduler_config, text_config, unet_config, vae_config

    cfg = CLIPTextConfig(**text_config(tokenizer))
    assert cfg.vocab_size == len(tokenizer) and cfg.max_position_embeddings == 32
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert unet_config()["cross_attention_dim"] == cfg.hidden_size
    # no transformer layers: a word's feature does not depend on the other words (what Replace needs)
    from transformers import CLIPTextModel

    assert cfg.num_hidden_layers == 0
    torch.manual_seed(0)
    encoder = CLIPTextModel(cfg).eval()
    ids = tokenizer(["a red circle on the left", "a blue circle on the left"], return_tensors="pt").input_ids
    with torch.no_grad():
        features = encoder(ids)[0]
    assert torch.equal(features[0, 3:], features[1, 3:]) and not torch.equal(features[0, 2], features[1, 2])
    with pytest.raises(ValueError, match="layers must be"):
        text_config(tokenizer, -1)
    assert len(vae_config()["block_out_channels"]) == 3  # 64x64 -> 16x16
    sched = DDIMScheduler(**scheduler_config())
    assert sched.config.prediction_type == "v_prediction"  # layout is learnt at high noise (see the docstring)
    # zero terminal SNR: the noisiest training input holds nothing of the image, sampled from t=999
    assert sched.config.rescale_betas_zero_snr and float(sched.alphas_cumprod[-1]) == 0.0
    sched.set_timesteps(20)
    assert int(sched.timesteps[0]) == 999 and int(sched.timesteps[-1]) == 49
    legacy = DDIMScheduler(**scheduler_config("epsilon"))
    assert legacy.config.steps_offset == 1 and not legacy.config.rescale_betas_zero_snr
    assert float(legacy.alphas_cumprod[-1]) > 0.004
    with pytest.raises(ValueError, match="v_prediction"):
        scheduler_config("sample")
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        scheduler_config("epsilon", zero_terminal_snr=True)
    from attnctrl.models.shapes.train import _prediction_type, _zero_terminal_snr, loss_weight

    assert _prediction_type({}) == "epsilon" and _prediction_type({"prediction_type": "v_prediction"}) == "v_prediction"
    assert _zero_terminal_snr({}) is False and _zero_terminal_snr({"zero_terminal_snr": True}) is True
    # in x0 terms both weightings are min(snr, 5) (+1 for v): the v loss keeps weight 1 at SNR 0
    snr = torch.tensor([0.0, 0.5, 5.0, 100.0], dtype=torch.float64)
    assert loss_weight(snr, "v_prediction", 5.0)[0] == 1.0
    x0_weight_v = loss_weight(snr, "v_prediction", 5.0) * (snr + 1)  # a v error is (snr+1)x an x0 error
    torch.testing.assert_close(x0_weight_v, torch.clamp(snr, max=5.0) + 1)
    x0_weight_eps = loss_weight(snr[1:], "epsilon", 5.0) * snr[1:]
    torch.testing.assert_close(x0_weight_eps, torch.clamp(snr[1:], max=5.0))
    from attnctrl.models.shapes.train import HIGH_NOISE_START, sample_timesteps

    uniform = sample_timesteps(20000, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(uniform, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))
    tilted = sample_timesteps(20000, torch.Generator().manual_seed(0), 0.5)
    assert tilted.min() >= 0 and tilted.max() <= 999
    high = (tilted >= HIGH_NOISE_START).double().mean().item()
    assert abs(high - (0.5 + 0.5 * 0.3)) < 0.02  # half drawn from [700, 1000), the other half uniform
    assert torch.equal(tilted, sample_timesteps(20000, torch.Generator().manual_seed(0), 0.5))


def test_shipped_model_folder():
    import json

    if not os.path.exists(os.path.join(SHAPES, "model_index.json")):
        pytest.skip("shapes model not trained yet")
    index = json.load(open(os.path.join(SHAPES, "model_index.json"), encoding="utf-8"))
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(SHAPES) for f in fs)
    assert total <= 30 * 2**20
    for sub in ("unet", "vae", "text_encoder"):
        files = os.listdir(os.path.join(SHAPES, sub))
        assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith(".bin") for f in files)
    for f in ("vocab.json", "merges.txt"):
        assert os.path.exists(os.path.join(SHAPES, "tokenizer", f))
    vae = json.load(open(os.path.join(SHAPES, "vae", "config.json"), encoding="utf-8"))
    assert 0.05 < vae["scaling_factor"] < 20


def test_training_runs_resumes_and_freezes_the_text_encoder(tmp_path):
    """A tiny end-to-end run of the training script: VAE, encoding, UNet steps, export, resume."""
    import json

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from attnctrl.models.shapes.train import (
        GROUNDING_WEIGHT,
        TEXT_ENCODER_LAYERS,
        _load_tensors,
        build_tokenizer,
        text_config,
        train,
    )

    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    common = dict(work_dir=work, pool_size=16, minutes=30, vae_minutes=0.02, batch_size=2, vae_batch_size=2, threads=1, log_every=1000)
    train(out, max_steps=2, train_text_encoder=True, **common)
    with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["unet_step"] == 2 and state["train_text_encoder"] is True and state["zero_terminal_snr"] is True
    assert state["high_noise_fraction"] == 0.5 and state["phase"] == "done" and state["occupancy_latent"] is False
    with pytest.raises(ValueError, match="latent space cannot change"):
        train(out, max_steps=3, resume=True, occupancy_latent=True, **common)
    occupancy_work = str(tmp_path / "occupancy")
    train(str(tmp_path / "occupancy-out"), max_steps=1, occupancy_latent=True, **{**common, "work_dir": occupancy_work})
    with open(os.path.join(occupancy_work, "ckpt", "state.json"), encoding="utf-8") as f:
        assert json.load(f)["occupancy_latent"] is True
    seeded = _load_tensors(os.path.join(work, "ckpt", "text_encoder.safetensors"))

    train(out, max_steps=4, resume=True, train_text_encoder=False, **common)  # freeze from step 2
    with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["unet_step"] == 4 and state["train_text_encoder"] is False and state["text_encoder_frozen_at_step"] == 2
    frozen = _load_tensors(os.path.join(work, "ckpt", "text_encoder.safetensors"))
    torch.manual_seed(1)  # the script's seed + 1: the encoder's random init
    init = CLIPTextModel(CLIPTextConfig(**text_config(build_tokenizer(str(tmp_path / "tok"))))).state_dict()
    assert all(torch.equal(frozen[k], init[k]) for k in frozen)
    assert not all(torch.equal(seeded[k], init[k]) for k in seeded)  # the jointly trained steps moved it
    with pytest.raises(ValueError, match="cannot be switched"):
        train(out, max_steps=5, resume=True, train_text_encoder=True, **common)
    with pytest.raises(ValueError, match="high_noise_fraction must be in"):
        train(out, max_steps=5, resume=True, high_noise_fraction=1.5, **common)
    with pytest.raises(ValueError, match="grounding_weight must be"):
        train(out, max_steps=5, resume=True, grounding_weight=-1.0, **common)
    assert state["grounding_weight"] == GROUNDING_WEIGHT and state["grounding_from_step"] == 0
    train(out, max_steps=5, resume=True, grounding_weight=0.0, **common)  # switch the grounding loss off
    with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["unet_step"] == 5 and state["grounding_weight"] == 0.0 and state["grounding_changes"] == [[4, 0.0]]
    assert state["attention_forcing"] == 0.0
    with pytest.raises(ValueError, match="attention_forcing must be in"):
        train(out, max_steps=6, resume=True, attention_forcing=2.0, **common)
    # forcing alone (grounding off) still installs the recording processors and trains a step
    train(out, max_steps=6, resume=True, attention_forcing=1.0, **common)
    with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["unet_step"] == 6 and state["attention_forcing"] == 1.0 and state["attention_forcing_changes"] == [[5, 1.0]]
    assert state["text_encoder_layers"] == TEXT_ENCODER_LAYERS == 0
    with pytest.raises(ValueError, match="text_encoder_layers must be"):
        train(out, max_steps=7, resume=True, text_encoder_layers=-1, **common)
    train(out, max_steps=7, resume=True, text_encoder_layers=1, **common)  # a different encoder from step 6
    with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["text_encoder_layers"] == 1 and state["text_encoder_layer_changes"] == [[6, 1]] and state["ema_from_step"] == 6
    torch.manual_seed(1)
    init1 = CLIPTextModel(CLIPTextConfig(**text_config(build_tokenizer(str(tmp_path / "tok")), 1))).state_dict()
    one_layer = _load_tensors(os.path.join(work, "ckpt", "text_encoder.safetensors"))
    assert one_layer.keys() == init1.keys() and all(torch.equal(one_layer[k], init1[k]) for k in one_layer)
    with open(os.path.join(out, "text_encoder", "config.json"), encoding="utf-8") as f:
        assert json.load(f)["num_hidden_layers"] == 1

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    # the exported tokenizer.json pads only when asked, although training tokenised with padding
    # (transformers resets this on load; the tokenizers library and other readers do not)
    with open(os.path.join(out, "tokenizer", "tokenizer.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["padding"] is None and saved["truncation"] is None
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on the left", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()

    # fine-tuning an exported folder: zero steps give back exactly the folder it started from
    from safetensors.torch import load_file

    tuned_common = {**common, "work_dir": str(tmp_path / "tuned-work")}
    tuned = str(tmp_path / "tuned")
    train(tuned, init_from=out, max_steps=0, **tuned_common)
    weights = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}
    for sub, name in weights.items():
        source, copy = load_file(os.path.join(out, sub, name)), load_file(os.path.join(tuned, sub, name))
        assert source.keys() == copy.keys() and all(torch.equal(source[k], copy[k]) for k in source), sub
    with open(os.path.join(out, "vae", "config.json"), encoding="utf-8") as f, open(os.path.join(tuned, "vae", "config.json"), encoding="utf-8") as g:
        assert json.load(f)["scaling_factor"] == json.load(g)["scaling_factor"]
    with open(os.path.join(tuned_common["work_dir"], "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["init_from"] == os.path.abspath(out) and state["text_encoder_layers"] == 1 and state["unet_step"] == 0
    train(tuned, max_steps=2, resume=True, attention_forcing=0.5, **tuned_common)  # then it trains on
    moved = load_file(os.path.join(tuned, "unet", weights["unet"]))
    source = load_file(os.path.join(out, "unet", weights["unet"]))
    assert not all(torch.equal(source[k], moved[k]) for k in source)
    with pytest.raises(ValueError, match="only starts a new run"):
        train(tuned, init_from=str(tmp_path / "occupancy-out"), max_steps=3, resume=True, **tuned_common)
    with pytest.raises(ValueError, match="already holds a checkpoint"):  # never overwrites a run
        train(tuned, init_from=out, max_steps=1, **tuned_common)
    with pytest.raises(ValueError, match="already holds a checkpoint"):  # nor does a plain new run
        train(out, max_steps=1, **common)
    with pytest.raises(ValueError, match="not an exported shapes model folder"):
        train(tuned, init_from=str(tmp_path / "nowhere"), max_steps=1, **{**common, "work_dir": str(tmp_path / "w2")})
    with pytest.raises(ValueError, match="0-layer text encoder, not 3"):
        train(tuned, init_from=str(tmp_path / "occupancy-out"), text_encoder_layers=3, max_steps=1, **{**common, "work_dir": str(tmp_path / "w3")})


def test_object_masks_cover_each_object_exactly():
    scene = Scene("black", (SceneObject("red", "star", "on the left", "big"), SceneObject("blue", "square", "at the top", "small")))
    full = object_masks(scene, 64)
    assert full.shape == (2, 64, 64) and full.dtype == np.float32 and 0 <= full.min() and full.max() <= 1
    image = render(scene, 64)
    found = {d.colour: d for d in analyze(image)}
    for k, o in enumerate(scene.objects):
        # the coverage is the object's own anti-aliased footprint: it agrees with what analyze() finds
        inside = full[k] > 0.5
        assert (inside & found[o.colour].mask).sum() / (inside | found[o.colour].mask).sum() > 0.9
        assert abs(full[k].sum() / 64**2 - 2.6 * o.radius**2) < 0.003  # every shape kind: area 2.6 R^2
    coarse = object_masks(scene, 16)
    pooled = full.reshape(2, 16, 4, 16, 4).mean(axis=(2, 4))
    assert np.abs(coarse - pooled).max() < 0.02  # the 16x16 grid is the box average of the fine one
    assert (coarse[0] * coarse[1]).sum() == 0  # objects never overlap


def test_object_token_positions(tokenizer):
    from attnctrl.models.shapes.train import object_token_positions

    scene = Scene("gray", (SceneObject("orange", "triangle", "on the left", "small"), SceneObject("green", "circle", "at the top")))
    text = "a green circle at the top and a small orange triangle on the left on a gray background"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
    positions = object_token_positions(tokenizer, scene, text)
    words = [[tokens[p].replace("</w>", "") for p in ps] for ps in positions]
    assert words == [["small", "orange", "tri", "angle"], ["green", "circle"]]  # scene order, every sub-word
    assert object_token_positions(tokenizer, scene, "") == [[], []]
    cache: dict[str, int] = {}
    assert object_token_positions(tokenizer, scene, text, cache) == positions and cache["triangle"] == 2
    for i in range(200):  # every training caption: each object has its colour and shape words
        sc, text = item_scene(i)
        toks = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
        for o, ps in zip(sc.objects, object_token_positions(tokenizer, sc, text, cache)):
            got = "".join(toks[p] for p in ps).replace("</w>", " ")
            assert o.colour in got and o.shape in got, (text, got)


def test_occupancy_latent_loss():
    from attnctrl.models.shapes.train import COLOUR_LATENT_BOUND, OCCUPANCY_LEVEL, occupancy_latent_loss

    occupancy = torch.zeros(2, 8, 8)
    occupancy[0, 2:5, 2:5] = 1.0
    occupancy[0, 5, 2:5] = 0.4  # edge cells: free
    occupancy[1, 0, 0] = 0.8
    ideal = torch.zeros(2, 4, 8, 8)
    ideal[:, 0] = torch.where(occupancy >= 0.7, OCCUPANCY_LEVEL, -OCCUPANCY_LEVEL)
    ideal[:, 1:] = COLOUR_LATENT_BOUND * torch.rand(2, 3, 8, 8).mul(2).sub(1)  # any colour within the bound
    ideal[0, 0, 5, 2:5] = 9.0  # whatever the edge cells hold
    assert occupancy_latent_loss(ideal, occupancy) == 0
    off = ideal.clone()
    off[1, 0, 0, 0] = -OCCUPANCY_LEVEL  # an object cell reading as background
    assert torch.isclose(occupancy_latent_loss(off, occupancy), torch.tensor((2 * OCCUPANCY_LEVEL) ** 2 / (128 - 3)))
    loud = ideal.clone()
    loud[0, 2, 0, 0] = COLOUR_LATENT_BOUND + 2.0  # a colour channel dominating the occupancy one
    assert torch.isclose(occupancy_latent_loss(loud, occupancy), torch.tensor(4.0 / (2 * 3 * 64)))
    mean = torch.randn(2, 4, 8, 8, requires_grad=True)
    occupancy_latent_loss(mean, occupancy).backward()
    assert mean.grad[0, 0, 5, 2:5].abs().sum() == 0 and mean.grad[:, 0].abs().sum() > 0


def test_grounding_loss():
    from attnctrl.models.shapes.train import grounding_loss

    torch.manual_seed(0)
    targets = torch.zeros(2, 5, 16, 16)
    targets[0, 1, 2:6, 2:6] = 1.0
    targets[1, 3, 8:16, 0:8] = 1.0
    supervised = torch.zeros(2, 5, dtype=torch.bool)
    supervised[0, 1] = supervised[1, 3] = True

    def probs_from(maps: torch.Tensor) -> torch.Tensor:  # (B, L, S, S) scores -> (B, S*S, L) probabilities
        return maps.flatten(2).transpose(1, 2).softmax(-1)

    uniform = [torch.full((2, n * n, 5), 0.2) for n in (16, 8, 4)]
    # uniform attention: the inside share is the (pooled, max-normalised) covered fraction
    expected = [((1 - 16 / 256) ** 2 + (1 - 64 / 256) ** 2) / 2, ((1 - 4 / 64) ** 2 + (1 - 16 / 64) ** 2) / 2, ((1 - 4 / 16) ** 2 + (1 - 4 / 16) ** 2) / 2]  # 2:6 straddles 4 cells of 4x4
    # and every object pixel reads its object's one word with 0.2: pixel term 0.8**2
    expected = [(token + 0.8**2) / 2 for token in expected]
    assert torch.allclose(grounding_loss(uniform, targets, supervised), torch.tensor(sum(expected) / 3), atol=1e-5)
    sink_scores = targets * 30.0
    sink_scores[:, 0] = 30.0 * (1 - targets.sum(1))  # elsewhere every pixel attends to token 0, as to BOS
    focused = probs_from(sink_scores)
    assert grounding_loss([focused], targets, supervised) < 1e-6
    coarse = [torch.full((2, 4, 5), 0.2), focused]  # 2x2 layers are skipped
    assert torch.allclose(grounding_loss(coarse, targets, supervised), grounding_loss([focused], targets, supervised))
    scores = torch.randn(2, 5, 16, 16, requires_grad=True)
    loss = grounding_loss([probs_from(scores)], targets, supervised)
    loss.backward()
    assert loss > 0 and scores.grad.abs().sum() > 0 and scores.grad[0, 0].abs().sum() > 0  # via the softmax
    assert grounding_loss(uniform, targets, torch.zeros_like(supervised)) == 0
    with pytest.raises(ValueError, match="no cross-attention layer"):
        grounding_loss([torch.full((2, 4, 5), 0.2)], targets, supervised)


def test_forced_attention():
    from attnctrl.models.shapes.train import forced_attention

    torch.manual_seed(0)
    probs = torch.randn(2, 3, 64, 6).softmax(-1)  # an 8x8 layer, 3 heads, 6 tokens
    targets = torch.zeros(2, 6, 16, 16)
    supervised = torch.zeros(2, 6, dtype=torch.bool)
    share = torch.zeros(2, 6)
    targets[0, 2:4, :8, :8] = 1.0  # one object (top-left quarter) named by tokens 2 and 3
    supervised[0, 2:4] = True
    share[0, 2:4] = 0.5
    forced = forced_attention(probs, targets, supervised, share)
    assert torch.allclose(forced.sum(-1), torch.ones(2, 3, 64))
    inside, outside = 0, 63  # cells (0, 0) and (7, 7)
    assert torch.allclose(forced[0, :, inside], torch.tensor([0, 0, 0.5, 0.5, 0, 0]).expand(3, 6))
    rest = probs[0, :, outside] * torch.tensor([1.0, 1, 0, 0, 1, 1])
    assert torch.allclose(forced[0, :, outside], rest / rest.sum(-1, keepdim=True))
    assert torch.allclose(forced[1], probs[1])  # nothing named: the model's own attention
    assert torch.equal(forced_attention(probs[:, :, :4], targets, supervised, share), probs[:, :, :4])  # 2x2: untouched
    scores = torch.randn(2, 3, 64, 6, requires_grad=True)
    forced_attention(scores.softmax(-1), targets, supervised, share)[0, :, outside, 0].sum().backward()
    assert scores.grad.abs().sum() > 0


def test_recording_cross_attention_matches_the_stock_processor():
    from diffusers import UNet2DConditionModel

    from attnctrl.models.shapes.train import _record_cross_attention, unet_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config()).eval()
    x, t, hidden = torch.randn(2, 4, 16, 16), torch.tensor([900, 10]), torch.randn(2, 32, unet.config.cross_attention_dim)
    with torch.no_grad():
        stock = unet(x, t, hidden).sample
        sink = _record_cross_attention(unet)
        recorded = unet(x, t, hidden).sample
    torch.testing.assert_close(recorded, stock, rtol=1e-5, atol=1e-5)
    grids = sorted({p.shape[1] for p in sink})
    assert grids == [4, 16, 64, 256] and all(p.shape[0] == 2 and p.shape[2] == 32 for p in sink)
    assert all(torch.allclose(p.sum(-1), torch.ones(())) for p in sink)


def test_delayed_attention_forcing_and_decoder_fine_tune_in_one_run(tmp_path, monkeypatch):
    """``attention_forcing_from`` holds forcing off for the first share of the planned steps, and
    ``decoder_minutes`` fine-tunes the decoder inside the run, before the UNet, counted in its budget."""
    import json

    import attnctrl.models.shapes.train as train_module
    from attnctrl.models.shapes.train import _forcing_active, train

    assert _forcing_active({"attention_forcing_from": 0.0, "planned_steps": None}, 0)
    assert not _forcing_active({"attention_forcing_from": 0.6, "planned_steps": None}, 500)  # no plan yet
    assert not _forcing_active({"attention_forcing_from": 0.6, "planned_steps": 10}, 5)
    assert _forcing_active({"attention_forcing_from": 0.6, "planned_steps": 10}, 6)

    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    common = dict(work_dir=work, pool_size=16, minutes=30, vae_minutes=0.02, batch_size=2, vae_batch_size=2, threads=1, log_every=1000)
    with pytest.raises(ValueError, match="attention_forcing_from must be"):
        train(out, max_steps=2, attention_forcing=0.5, attention_forcing_from=1.0, **common)
    with pytest.raises(ValueError, match="give attention_forcing > 0"):
        train(out, max_steps=2, attention_forcing_from=0.5, **common)
    with pytest.raises(ValueError, match="decoder_minutes must be"):
        train(out, max_steps=2, decoder_minutes=-1.0, **common)
    # the loop must force only at the steps the gate opens: record the gate's answers and the forcing
    events = []
    gate, force = train_module._forcing_active, train_module.forced_attention
    monkeypatch.setattr(train_module, "_forcing_active", lambda st, step: events.append(("gate", step, gate(st, step))) or events[-1][2])
    monkeypatch.setattr(train_module, "forced_attention", lambda *a: events.append(("forced",)) or force(*a))
    with pytest.raises(ValueError, match="decoder_splice must be"):
        train(out, max_steps=2, decoder_minutes=1.0, decoder_splice=1.5, **common)
    with pytest.raises(ValueError, match="give decoder_minutes > 0"):
        train(out, max_steps=2, decoder_splice=0.5, **common)
    train(out, max_steps=4, attention_forcing=1.0, attention_forcing_from=0.5, decoder_minutes=0.01, decoder_splice=0.5, **common)
    gates = [e for e in events if e[0] == "gate"]
    assert [(step, on) for _, step, on in gates] == [(0, False), (1, False), (2, True), (3, True)]
    last_gate = None
    for e in events:
        if e[0] == "gate":
            last_gate = e
        else:
            assert last_gate is not None and last_gate[2], "forcing applied at a step the gate kept closed"
    assert any(e[0] == "forced" for e in events)
    with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["unet_step"] == 4 and state["attention_forcing"] == 1.0 and state["attention_forcing_from"] == 0.5
    with open(os.path.join(work, "vae_decoder_ft.json"), encoding="utf-8") as f:
        decoder = json.load(f)
    assert decoder["step"] > 0 and state["elapsed"] >= decoder["elapsed"] and decoder["splice_share"] == 0.5
    with pytest.raises(ValueError, match="fixed when the UNet phase starts"):
        train(out, max_steps=5, resume=True, attention_forcing_from=0.2, **common)


def test_decoder_batches_splice_two_scenes_with_the_same_cut_in_latents_and_pixels():
    """A spliced decoder batch is two pool scenes cut by one rectangle (3 to 9 latent pixels a side):
    latents, target pixels and background colours all take the same cut; other batches are crops."""
    from attnctrl.models.shapes.train import _decoder_batch, _to_pixels

    n = 40
    ids = torch.arange(n, dtype=torch.float32)
    lat = ids[:, None, None, None].expand(n, 4, 16, 16).contiguous()  # every latent says its scene
    pool_u8 = (ids * 5).to(torch.uint8)[:, None, None, None].expand(n, 64, 64, 3).contiguous()
    bg = torch.stack([ids * 0.01, -ids * 0.01, ids * 0.0], dim=1)
    spliced = 0
    for step in range(24):
        rng = np.random.default_rng([0, 3, step])
        z, x, b = _decoder_batch(rng, step, lat, pool_u8, bg, batch_size=6, crop=8, splice_share=1.0)
        assert z.shape == (6, 4, 16, 16) and x.shape == b.shape == (6, 3, 64, 64)
        scene = z[:, 0].round().long()  # (6, 16, 16)
        assert torch.equal(z, scene[:, None].float().expand_as(z))
        scene_px = scene.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
        assert torch.allclose(x, _to_pixels((scene_px * 5).to(torch.uint8)[..., None].expand(6, 64, 64, 3)))
        assert torch.allclose(b, bg[scene_px].permute(0, 3, 1, 2))
        for k in range(6):
            values = scene[k].unique()
            if len(values) == 1:
                continue  # the two draws were the same scene
            spliced += 1
            assert len(values) == 2
            inside = None
            for v in values:
                rows, cols = torch.nonzero(scene[k] == v, as_tuple=True)
                h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
                if h * w == len(rows) and 3 <= h <= 9 and 3 <= w <= 9:
                    inside = v
            assert inside is not None, "no region of the splice is a 3..9 rectangle"
    assert spliced >= 100
    shapes = set()
    for step in range(8):
        z, x, b = _decoder_batch(np.random.default_rng([0, 3, step]), step, lat, pool_u8, bg, batch_size=2, crop=8, splice_share=0.0)
        assert x.shape[-1] == 4 * z.shape[-1] and b.shape == x.shape
        assert all(len(z[k, 0].unique()) == 1 for k in range(2))  # a crop never mixes scenes
        shapes.add((step % 4 == 3, z.shape[-1]))
    assert shapes == {(False, 8), (True, 16)}
    with pytest.raises(ValueError, match="splice_share must be"):
        from attnctrl.models.shapes.train import finetune_decoder

        finetune_decoder("/nonexistent", splice_share=-0.1)


def test_colour_oversampling_draws_scenes_with_the_named_colours_more_often(tmp_path, monkeypatch):
    """``colour_weights`` (CLI ``--oversample COLOUR=WEIGHT``) weights each pool scene by the largest
    weight of its objects' colours; it is validated, recorded in state.json and kept on resume."""
    import json

    import attnctrl.models.shapes.train as train_module
    from attnctrl.models.shapes import Scene, SceneObject
    from attnctrl.models.shapes.train import _parse_oversample, scene_sampling_probs, train

    def obj(colour: str, position: str) -> SceneObject:
        return SceneObject(colour=colour, shape="circle", position=position)

    scenes = [
        Scene("white", (obj("purple", "in the top left corner"),)),
        Scene("gray", (obj("red", "in the top left corner"),)),
        Scene("white", (obj("red", "in the top left corner"), obj("purple", "in the top right corner"))),
        Scene("black", (obj("blue", "in the top left corner"), obj("green", "in the top right corner"))),
    ]
    assert np.allclose(scene_sampling_probs(scenes, {"purple": 3.0}), np.array([3, 1, 3, 1]) / 8)
    assert np.allclose(scene_sampling_probs(scenes, {"purple": 3.0, "red": 0.5}), np.array([3, 0.5, 3, 1]) / 7.5)
    assert _parse_oversample(None) is None
    assert _parse_oversample(["purple=3", "red=0.5"]) == {"purple": 3.0, "red": 0.5}
    for bad in ("purple", "purple=x", "purple=inf"):
        with pytest.raises(ValueError, match="COLOUR=WEIGHT"):
            _parse_oversample([bad])

    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    common = dict(work_dir=work, pool_size=16, minutes=30, vae_minutes=0.02, batch_size=4, vae_batch_size=2, threads=1, log_every=1000)
    with pytest.raises(ValueError, match="unknown colour 'gray'"):
        train(out, max_steps=1, colour_weights={"gray": 2.0}, **common)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        train(out, max_steps=1, colour_weights={"purple": 0.0}, **common)
    seen = []
    probs = train_module.scene_sampling_probs
    monkeypatch.setattr(train_module, "scene_sampling_probs", lambda sc, w: seen.append(dict(w)) or probs(sc, w))
    train(out, max_steps=2, colour_weights={"purple": 1000.0}, **common)
    state_path = os.path.join(work, "ckpt", "state.json")
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    assert state["colour_weights"] == {"purple": 1000.0} and state["colour_weight_changes"] == [[0, {"purple": 1000.0}]]
    assert seen == [{"purple": 1000.0}]
    train(out, max_steps=3, resume=True, **common)  # kept on resume
    assert seen[-1] == {"purple": 1000.0}
    train(out, max_steps=4, resume=True, colour_weights={}, **common)  # switched off
    with open(state_path, encoding="utf-8") as f:
        state = json.load(f)
    assert state["colour_weights"] == {} and state["colour_weight_changes"][-1] == [3, {}] and len(seen) == 2


def test_unet_object_loss_weight_is_validated_recorded_kept_on_resume_and_changes_the_update(tmp_path, monkeypatch):
    """``object_loss_weight`` (CLI ``--object-loss-weight W``) weights the UNet's denoising loss with
    :func:`object_loss_weights` of the batch's scenes: validated, recorded in state.json, kept on
    resume, switchable off, and a weighted step moves the UNet differently from an unweighted one."""
    import json

    from safetensors.torch import load_file

    import attnctrl.models.shapes.train as train_module
    from attnctrl.models.shapes.train import train

    common = dict(pool_size=16, minutes=30, vae_minutes=0.02, batch_size=4, vae_batch_size=2, threads=1, log_every=1000)
    with pytest.raises(ValueError, match="object_loss_weight must be"):
        train(str(tmp_path / "o"), work_dir=str(tmp_path / "bad"), max_steps=1, object_loss_weight=-1.0, **common)
    calls = []
    weights = train_module.object_loss_weights
    monkeypatch.setattr(train_module, "object_loss_weights",
                        lambda sc, idx, grid, cache, extra, dev: calls.append((len(idx), grid, extra)) or weights(sc, idx, grid, cache, extra, dev))
    unets = {}
    for extra in (0.0, 2.0):
        work = str(tmp_path / f"w{extra}")
        train(str(tmp_path / f"o{extra}"), work_dir=work, max_steps=1, object_loss_weight=extra, **common)
        with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
            assert json.load(f)["object_loss_weight"] == extra
        unets[extra] = load_file(os.path.join(work, "ckpt", "unet.safetensors"))
    assert calls == [(4, 16, 2.0)]  # only the weighted run computes cell weights
    assert any(not torch.equal(unets[0.0][k], unets[2.0][k]) for k in unets[0.0])
    work = str(tmp_path / "w2.0")
    train(str(tmp_path / "o2.0"), work_dir=work, max_steps=2, resume=True, **common)  # kept on resume
    assert calls[-1] == (4, 16, 2.0) and len(calls) == 2
    train(str(tmp_path / "o2.0"), work_dir=work, max_steps=3, resume=True, object_loss_weight=0.0, **common)
    with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert len(calls) == 2 and state["object_loss_weight"] == 0.0 and state["object_loss_weight_changes"] == [[2, 0.0]]
