"""The embedded flow-matching shapes model (``attnctrl.models.SHAPES_FLOW``) and its training script."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from attnctrl.models import SHAPES, SHAPES_FLOW

SIZE_LIMIT_MB = 30.0  # the whole folder; the repository travels to GPU machines with a 64 MiB limit


def _folder_files(root: str) -> list[str]:
    return [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs]


def test_shapes_flow_is_exported():
    import attnctrl.models as models

    assert "SHAPES_FLOW" in models.__all__
    assert os.path.isabs(SHAPES_FLOW) and os.path.isfile(os.path.join(SHAPES_FLOW, "model_index.json"))


def test_folder_is_safetensors_and_json_within_the_size_limit():
    files = _folder_files(SHAPES_FLOW)
    weights = [f for f in files if f.endswith(".safetensors")]
    assert {f.split(os.sep)[0] for f in weights} >= {"transformer", "vae", "text_encoder", "text_encoder_2"}
    # tokenizer folders also hold merges.txt (BPE merges, plain text); nothing pickled, nothing else
    assert all(f.endswith((".safetensors", ".json", ".txt")) for f in files), files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for f in files)
    size_mb = sum(os.path.getsize(os.path.join(SHAPES_FLOW, f)) for f in files) / 2**20
    assert size_mb <= SIZE_LIMIT_MB, f"{size_mb:.1f} MB"
    with open(os.path.join(SHAPES_FLOW, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]


def test_package_data_ships_every_file_of_the_folder():
    """pyproject's package-data globs cover the whole folder (so wheels carry it; test_packaging builds one)."""
    import tomllib
    from pathlib import Path, PurePosixPath

    root = Path(__file__).resolve().parents[1]
    with open(root / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["attnctrl.models.shapes"]
    package = Path(SHAPES_FLOW).parent
    for name in _folder_files(SHAPES_FLOW):
        rel = PurePosixPath(Path(SHAPES_FLOW, name).relative_to(package).as_posix())
        assert any(len(rel.parts) == len(PurePosixPath(g).parts) and rel.match(g) for g in globs), rel


@pytest.fixture(scope="module")
def flow_pipe():
    from diffusers import DiffusionPipeline

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        pipe = DiffusionPipeline.from_pretrained(SHAPES_FLOW)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_stock_loader_generates_64x64(flow_pipe):
    from diffusers import StableDiffusion3Pipeline

    assert isinstance(flow_pipe, StableDiffusion3Pipeline)
    vae = flow_pipe.vae.config
    assert vae.latent_channels == 4 and vae.shift_factor is not None and vae.scaling_factor > 0
    out = flow_pipe("a red circle on the left", num_inference_steps=2, guidance_scale=5.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_t5_stand_in_equals_no_t5(flow_pipe):
    """text_encoder_3 outputs exact zeros: the same images as the pipeline without a T5 encoder."""
    from diffusers import StableDiffusion3Pipeline

    bare = StableDiffusion3Pipeline(**{**flow_pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    bare.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
    a = flow_pipe("a blue square at the top", generator=torch.Generator().manual_seed(1), **kwargs).images
    b = bare("a blue square at the top", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert np.array_equal(a, b)


def test_null_token_processor_equals_the_full_sequence():
    """Training's one null token with logit + ln(256) gives the stock outputs for 256 zero tokens."""
    from diffusers import SD3Transformer2DModel

    from attnctrl.models.shapes.train_flow import FlowModelConfig, JointAttentionWithNullTokens, transformer_config

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**transformer_config(FlowModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8))).eval()
    x, words, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 32, 256), torch.randn(2, 256)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        stock = model(x, torch.cat([words, torch.zeros(2, 256, 256)], 1), pooled, t).sample
        sink: list[torch.Tensor] = []
        for block in model.transformer_blocks:
            block.attn.set_processor(JointAttentionWithNullTokens(256, 32, sink))
        ours = model(x, torch.cat([words, torch.zeros(2, 1, 256)], 1), pooled, t).sample
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
    assert len(sink) == 2 and sink[0].shape == (2, 64, 32)
    torch.testing.assert_close(sink[0].sum(-1), torch.ones(2, 64))


def test_flow_matching_pair_follows_the_scheduler():
    """x_t is the scheduler's scale_noise at sigma = t, and an Euler step with the exact target lands
    on the path at the next sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from attnctrl.models.shapes.train_flow import flow_matching_pair

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    sched.set_timesteps(10)
    x0, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    sigma = sched.sigmas[3]
    xt, target = flow_matching_pair(x0, noise, sigma.view(1))
    torch.testing.assert_close(xt, sched.scale_noise(x0, sched.timesteps[3:4], noise))
    sched._step_index = 3
    stepped = sched.step(target, sched.timesteps[3], xt).prev_sample
    expected, _ = flow_matching_pair(x0, noise, sched.sigmas[4].view(1))
    torch.testing.assert_close(stepped, expected, atol=1e-5, rtol=1e-5)


def test_training_step_is_finite_and_resume_is_exact(tmp_path):
    from safetensors.torch import load_file

    from attnctrl.models.shapes.train_flow import FlowModelConfig, FlowTrainConfig, train_flow

    config = FlowTrainConfig(pool_size=32, batch_size=4, warmup=2)
    model = FlowModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, text_layer_width=16)
    kwargs = dict(config=config, model=model, max_steps=4, shapes_dir=SHAPES, log_every=1000, threads=None, device="cpu")
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train_flow(None, work_dir=straight, **kwargs)
    train_flow(None, work_dir=split, stop_at_step=2, **kwargs)
    with open(os.path.join(split, "ckpt", "state.json"), encoding="utf-8") as f:
        assert json.load(f)["step"] == 2
    train_flow(None, work_dir=split, resume=True, **kwargs)
    for name in ("transformer", "ema", "optimizer"):
        a = load_file(os.path.join(straight, "ckpt", f"{name}.safetensors"))
        b = load_file(os.path.join(split, "ckpt", f"{name}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    with open(os.path.join(straight, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["step"] == 4 and math.isfinite(state["last_loss"])
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train_flow(None, work_dir=straight, **kwargs)


def test_attention_forcing_sets_the_word_attention_of_the_forced_rows_only():
    """Forced rows: the image queries' attention on the words keeps the model's total mass but is shared
    as ``forced_attention`` says; image-to-image and null attention and every other row stay the model's own,
    and the sink still records the model's own maps."""
    from diffusers import SD3Transformer2DModel

    from attnctrl.models.shapes.train import AttentionForcing, forced_attention
    from attnctrl.models.shapes.train_flow import FlowModelConfig, JointAttentionWithNullTokens, transformer_config

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**transformer_config(FlowModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=8)))
    attn = transformer.transformer_blocks[0].attn
    g = torch.Generator().manual_seed(1)
    n_image, words = 64, 32
    image, context = torch.randn(2, n_image, 16, generator=g), torch.randn(2, words + 1, 16, generator=g)
    sink: list[torch.Tensor] = []
    forcing = AttentionForcing()
    processor = JointAttentionWithNullTokens(256, words, sink, forcing)
    with torch.no_grad():
        free_image, free_context = processor(attn, image, context)
        targets = torch.zeros(2, words, 16, 16)
        targets[:, 2:4, 2:10, 4:12] = 1.0  # an object named by tokens 2 and 3
        supervised = torch.zeros(2, words, dtype=torch.bool)
        supervised[:, 2:4] = True
        share = supervised * 0.5
        forcing.rows, forcing.targets, forcing.supervised, forcing.token_share = torch.tensor([False, True]), targets, supervised, share
        forced_image, forced_context = processor(attn, image, context)
        # the model's own probabilities, recomputed
        split = lambda y: y.view(2, y.shape[1], attn.heads, -1).transpose(1, 2)
        q = torch.cat([attn.norm_q(split(attn.to_q(image))), attn.norm_added_q(split(attn.add_q_proj(context)))], 2)
        k = torch.cat([attn.norm_k(split(attn.to_k(image))), attn.norm_added_k(split(attn.add_k_proj(context)))], 2)
        v = torch.cat([split(attn.to_v(image)), split(attn.add_v_proj(context))], 2)
        bias = torch.zeros(k.shape[2])
        bias[-1] = math.log(256)
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, -1)
    assert torch.equal(sink[0], sink[1])  # the model's own maps both times
    assert torch.equal(free_image[0], forced_image[0]) and torch.equal(free_context, forced_context)
    t2i = probs[1:, :, :n_image, n_image:n_image + words]
    mass = t2i.sum(-1, keepdim=True)
    expected_t2i = mass * forced_attention(t2i / mass, targets[1:], supervised[1:], share[1:])
    rows = torch.cat([probs[1:, :, :n_image, :n_image], expected_t2i, probs[1:, :, :n_image, n_image + words:]], -1)
    expected = attn.to_out[0]((rows @ v[1:]).transpose(1, 2).reshape(1, n_image, -1))
    torch.testing.assert_close(forced_image[1:], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(forced_image[1], free_image[1])
    # inside the object the forced words share each cell's word mass between tokens 2 and 3
    inside = expected_t2i[0, :, 1 * 8 + 3]  # cell (1, 3) of the 8x8 grid is inside the object
    torch.testing.assert_close(inside[:, 2], inside[:, 3])
    torch.testing.assert_close(inside[:, 2] + inside[:, 3], mass[0, :, 1 * 8 + 3, 0])


def test_training_with_attention_forcing_runs_and_records_it(tmp_path):
    from attnctrl.models.shapes.train_flow import FlowModelConfig, FlowTrainConfig, train_flow

    with pytest.raises(ValueError, match="attention_forcing must be in"):
        FlowTrainConfig(attention_forcing=1.5).validate()
    config = FlowTrainConfig(pool_size=16, batch_size=4, warmup=1, attention_forcing=1.0, cond_drop=0.0)
    model = FlowModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, text_layer_width=16)
    work = str(tmp_path / "forced")
    train_flow(None, work_dir=work, config=config, model=model, max_steps=2, shapes_dir=SHAPES, log_every=1000,
               threads=None, device="cpu")
    with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    assert state["config"]["attention_forcing"] == 1.0 and state["step"] == 2 and math.isfinite(state["last_loss"])


def test_training_reduces_the_loss_on_a_fixed_batch():
    """A few optimiser steps on one batch lower the flow-matching loss (the target is learnable)."""
    from diffusers import SD3Transformer2DModel

    from attnctrl.models.shapes.train_flow import FlowModelConfig, flow_matching_pair, sample_flow_times, transformer_config

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**transformer_config(FlowModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    t = sample_flow_times(4, g)
    words, pooled = torch.randn(4, 33, 256, generator=g), torch.randn(4, 256, generator=g)
    xt, target = flow_matching_pair(x0, noise, t)
    losses = []
    for _ in range(8):
        loss = (model(xt, words, pooled, t * 1000).sample - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_cli_train_shapes_flow_forwards_to_the_flow_parser(capsys):
    from attnctrl import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["train-shapes", "--flow", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--grounding-weight" in out and "--time-sampling" in out


def test_fine_tune_starts_from_an_exported_folder_and_keeps_its_encoders(tmp_path):
    """``init_from`` starts at the folder's weights (step 0 = the export's EMA), keeps its text encoders and
    latent normalisation, and refuses to restart a run that already exists or a folder that is not a flow model."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection

    from attnctrl.models.shapes.train_flow import FlowModelConfig, FlowTrainConfig, main, train_flow

    config = FlowTrainConfig(pool_size=16, batch_size=2, warmup=1)
    model = FlowModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, text_layer_width=16)
    base, exported = str(tmp_path / "base"), str(tmp_path / "exported")
    train_flow(exported, work_dir=base, config=config, model=model, max_steps=2, shapes_dir=SHAPES, log_every=1000,
               threads=None, device="cpu")
    tuned = str(tmp_path / "tuned")
    train_flow(None, work_dir=tuned, config=config, max_steps=1, stop_at_step=0, shapes_dir=SHAPES, log_every=1000,
               threads=None, device="cpu", init_from=exported)
    start = SD3Transformer2DModel.from_pretrained(exported, subfolder="transformer").state_dict()
    saved = load_file(os.path.join(tuned, "ckpt", "transformer.safetensors"))
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in start)
    with open(os.path.join(tuned, "ckpt", "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    with open(os.path.join(exported, "vae", "config.json"), encoding="utf-8") as f:
        vae = json.load(f)
    assert state["model"] == {**model.__dict__} and state["shift_factor"] == vae["shift_factor"]
    out = str(tmp_path / "tuned-out")
    train_flow(out, work_dir=tuned, resume=True, max_steps=1, shapes_dir=SHAPES, log_every=1000, threads=None, device="cpu",
               init_from=exported)
    for name in ("text_encoder", "text_encoder_2"):
        a = CLIPTextModelWithProjection.from_pretrained(exported, subfolder=name).state_dict()
        b = CLIPTextModelWithProjection.from_pretrained(out, subfolder=name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="only starts a new run"):
        train_flow(None, work_dir=base, resume=True, max_steps=2, shapes_dir=SHAPES, threads=None, device="cpu", init_from=out)
    with pytest.raises(ValueError, match="not an exported flow shapes folder|not a flow shapes folder"):
        train_flow(None, work_dir=str(tmp_path / "bad"), config=config, max_steps=1, shapes_dir=SHAPES, threads=None,
                   device="cpu", init_from=SHAPES)
    with pytest.raises(ValueError, match="drop --num-layers"):
        main(["--work", str(tmp_path / "x"), "--init-from", exported, "--num-layers", "2"])
    with pytest.raises(ValueError, match="must divide"):
        main(["--work", str(tmp_path / "y"), "--init-from", exported, "--patch-size", "3"])
    with pytest.raises(ValueError, match="give init_from too"):
        train_flow(None, work_dir=str(tmp_path / "z"), config=config, max_steps=1, shapes_dir=SHAPES, threads=None,
                   device="cpu", init_patch_size=1)
    # a finer patch: the run starts from the re-patched weights and exports a patch-1 SD3 folder
    fine_out = str(tmp_path / "fine-out")
    main(["--work", str(tmp_path / "fine"), "--out", fine_out, "--init-from", exported, "--patch-size", "1",
          "--max-steps", "1", "--pool-size", "16", "--batch-size", "2", "--shapes-model", SHAPES, "--threads", "1"])
    fine = SD3Transformer2DModel.from_pretrained(fine_out, subfolder="transformer")
    assert fine.config.patch_size == 1 and fine.pos_embed.proj.kernel_size == (1, 1)


def test_repatched_state_keeps_flat_regions_and_the_old_layout():
    """Re-patching 2 -> 1 keeps the blocks, embeds a flat latent as the old patch embedding did, and
    places each new token at the old grid's coordinate of its centre (same patch: nothing changes)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid

    from attnctrl.models.shapes.train_flow import FlowModelConfig, repatched_transformer_state, transformer_config

    torch.manual_seed(0)
    old = SD3Transformer2DModel(**transformer_config(FlowModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8)))
    state = old.state_dict()
    same = repatched_transformer_state(state, 2, 2)
    assert same.keys() == state.keys() and all(torch.equal(same[k], state[k]) for k in state)

    fine = repatched_transformer_state(state, 2, 1)
    new = SD3Transformer2DModel(**transformer_config(FlowModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8,
                                                                     patch_size=1)))
    new.load_state_dict(fine)  # every shape fits
    assert all(torch.equal(fine[k], state[k]) for k in state if k.startswith("transformer_blocks."))
    flat = torch.randn(1, 4, 1, 1).expand(1, 4, 6, 6)
    coarse_tokens = old.pos_embed.proj(flat)  # (1, dim, 3, 3)
    fine_tokens = new.pos_embed.proj(flat)  # (1, dim, 6, 6)
    torch.testing.assert_close(fine_tokens[..., ::2, ::2], coarse_tokens, rtol=1e-5, atol=1e-5)
    # proj_out: where the old projection drew the same value in all 4 sub-pixels, the new one draws it
    proj = state["proj_out.weight"].reshape(2, 2, 4, -1)
    torch.testing.assert_close(fine["proj_out.weight"], proj.mean(dim=(0, 1)))
    # positions: the two new tokens of an old token sit symmetrically about its coordinate
    old_pos = state["pos_embed.pos_embed"].reshape(16, 16, -1)
    new_pos = fine["pos_embed.pos_embed"].reshape(32, 32, -1)
    half = old_pos.shape[-1] // 2  # the first half encodes the column coordinate
    # new tokens 2k and 2k+1 sit at old coordinate c_k -/+ 1/8: sin/cos(a - d) + sin/cos(a + d) = 2 cos(d) sin/cos(a)
    offset = get_1d_sincos_pos_embed_from_grid(half, torch.tensor([0.125]), output_type="pt")[0]
    cos_d = offset[half // 2:].repeat(2).float()
    torch.testing.assert_close(new_pos[0, 0::2, :half] + new_pos[0, 1::2, :half], 2 * cos_d * old_pos[0, :, :half],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not divide"):
        repatched_transformer_state(state, 2, 3)


def test_object_loss_weights_cover_the_objects_and_their_border():
    from attnctrl.models.shapes import Scene, SceneObject, object_masks
    from attnctrl.models.shapes.train import object_loss_weights

    scene = Scene("black", (SceneObject("purple", "star", "on the left"),))
    coverage = torch.from_numpy(object_masks(scene, 16))[0]
    weights = object_loss_weights([scene], np.array([0]), 16, {}, 2.0, torch.device("cpu"))
    assert weights.shape == (1, 16, 16)
    inside = coverage == 1.0
    assert inside.any() and torch.equal(weights[0][inside], torch.full((int(inside.sum()),), 3.0))
    assert weights[0, :, -1].eq(1.0).all()  # far from the object
    # a background cell next to the star is weighted as its most covered neighbour
    border = (coverage == 0) & (weights[0] > 1.0)
    assert border.any()
    near = torch.nn.functional.max_pool2d(coverage[None, None], 3, 1, 1)[0, 0]
    torch.testing.assert_close(weights[0], 1.0 + 2.0 * near)


def test_training_with_object_loss_weight_runs_and_changes_the_update(tmp_path):
    from safetensors.torch import load_file

    from attnctrl.models.shapes.train_flow import FlowModelConfig, FlowTrainConfig, train_flow

    with pytest.raises(ValueError, match="object_loss_weight must be"):
        FlowTrainConfig(object_loss_weight=-1.0).validate()
    model = FlowModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, text_layer_width=16)
    weights = {}
    for extra in (0.0, 3.0):
        work = str(tmp_path / f"w{extra}")
        config = FlowTrainConfig(pool_size=16, batch_size=4, warmup=1, object_loss_weight=extra)
        train_flow(None, work_dir=work, config=config, model=model, max_steps=2, shapes_dir=SHAPES, log_every=1000,
                   threads=None, device="cpu")
        with open(os.path.join(work, "ckpt", "state.json"), encoding="utf-8") as f:
            state = json.load(f)
        assert state["config"]["object_loss_weight"] == extra and math.isfinite(state["last_loss"])
        weights[extra] = load_file(os.path.join(work, "ckpt", "transformer.safetensors"))
    assert any(not torch.equal(weights[0.0][k], weights[3.0][k]) for k in weights[0.0])
