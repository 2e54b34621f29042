"""Efficient-attention policies inside MM-DiT joint attention (SD3/SD3.5, Flux.1): image->image
restricted, text keeps full attention; exact remove; under Prompt-to-Prompt; meta; half precision."""

from __future__ import annotations

import pytest
import torch

import attnctrl
from attnctrl import GroupedAttention, ProxyAttention, Replace, WindowAttention
from attnctrl.errors import UnsupportedModelError
from attnctrl.kernels import reference_attention
from attnctrl.policies import PolicyState
from attnctrl.policies.proxy import window_proxies
from attnctrl.policies.window import window_size
from attnctrl.processors import JointPolicyProcessor, PolicyProcessor
from attnctrl.processors.joint_policy import joint_policy_attention

from mmdit_models import build_flux, build_sd3
from test_mmdit_meta import FLUX_DEV, SD35_MEDIUM
from test_mmdit_meta import T5 as META_T5
from test_mmdit_meta import forward as meta_forward

torch.set_num_threads(1)

PROMPTS = ["a photo of a cat on the grass", "a photo of a tiger on the grass"]
STEPS = 2
#: one config per MM-DiT policy, sized for the tiny pipelines' 8x8 token grid
POLICIES = {
    "window": WindowAttention(),
    "window-swin": WindowAttention(swin_mask=True),
    "proxy": ProxyAttention(window=4),
    "grouped": GroupedAttention(group=2),
    "grouped-criss-cross": GroupedAttention(group=2, pattern="criss-cross"),
}



@pytest.fixture(scope="module")
def sd3(tokenizer, t5_tokenizer):
    return build_sd3(tokenizer, t5_tokenizer, dual=True)


@pytest.fixture(scope="module")
def flux(tokenizer, t5_tokenizer):
    return build_flux(tokenizer, t5_tokenizer)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request, sd3, flux):
    return sd3 if request.param == "sd3" else flux


def generate(pipe, prompt=PROMPTS[0], seed=3, **kwargs):
    return pipe(
        prompt=prompt, num_inference_steps=STEPS, height=32, width=32, output_type="latent",
        generator=torch.Generator().manual_seed(seed), max_sequence_length=12, **kwargs,
    ).images


# ---- the attention math, one joint call ---------------------------------------------------------
def _state(config, step: int = 0, steps: int = 1, grid=(6, 8)) -> PolicyState:
    state = PolicyState(config, patch_size=1)
    state.clock.tick(torch.tensor(1.0), step=step, num_steps=steps)
    state.latent_hw = grid
    return state


def _joint(text_first: bool, grid=(6, 8), text=5, seed=0, heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1] + text
    q, k, v = (torch.randn(2, heads, n, dim, generator=g, dtype=torch.float64) for _ in range(3))
    image = slice(text, n) if text_first else slice(0, grid[0] * grid[1])
    texts = slice(0, text) if text_first else slice(grid[0] * grid[1], n)
    return q, k, v, image, texts


def _masked_reference(q, k, v, image, text, allowed):
    """Joint attention where image query i sees image key j iff allowed[i, j], every text key, and
    text queries see everything: an explicit (S, S) mask, float64 reference softmax."""
    n = q.shape[2]
    mask = torch.ones(n, n, dtype=torch.bool)
    image_index = torch.arange(n)[image]
    mask[image_index[:, None], image_index[None, :]] = allowed
    out, _ = reference_attention(q, k, v, mask=mask)
    return out


def _window_allowed(h, w, windows):
    wh, ww = window_size(h, w, windows)
    rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
    cell = (rows // wh) * 1000 + cols // ww
    return cell[:, None] == cell[None, :]


def _group_allowed(h, w, group, pattern, radius=1):
    rows, cols = torch.arange(h * w) // w // group, torch.arange(h * w) % w // group
    dr, dc = (rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs()
    return torch.maximum(dr, dc) <= radius if pattern == "neighborhood" else (dr == 0) | (dc == 0)


@pytest.mark.parametrize("text_first", [False, True], ids=["image-text", "text-image"])
@pytest.mark.parametrize(
    "config, allowed",
    [
        (WindowAttention(shift="none"), lambda h, w: _window_allowed(h, w, (2, 2))),
        (WindowAttention(windows=(3, 2), shift="none"), lambda h, w: _window_allowed(h, w, (3, 2))),  # padded
        (GroupedAttention(group=2, implementation="routing"), lambda h, w: _group_allowed(h, w, 2, "neighborhood")),
        (GroupedAttention(group=2, implementation="gather"), lambda h, w: _group_allowed(h, w, 2, "neighborhood")),
        (GroupedAttention(group=2, implementation="strips"), lambda h, w: _group_allowed(h, w, 2, "neighborhood")),
        (GroupedAttention(group=(4, 3), implementation="gather"), None),  # partial groups: checked below
        (GroupedAttention(group=2, pattern="criss-cross"), lambda h, w: _group_allowed(h, w, 2, "criss-cross")),
    ],
    ids=["window", "window-padded", "grouped-routing", "grouped-gather", "grouped-strips", "grouped-partial", "criss-cross"],
)
def test_image_to_image_restricted_text_full(config, allowed, text_first):
    """Sharp check against an explicit masked softmax: image queries see every text key plus exactly
    the policy's image keys, in one joint softmax; text queries see every key (= stock rows)."""
    grid = (6, 8)
    q, k, v, image, text = _joint(text_first, grid)
    out = joint_policy_attention(config, _state(config), q, k, v, grid=grid, text_first=text_first)
    if allowed is None:
        rows = torch.arange(48) // 8 // 4
        cols = torch.arange(48) % 8 // 3
        dr, dc = (rows[:, None] - rows[None, :]).abs(), (cols[:, None] - cols[None, :]).abs()
        mask = torch.maximum(dr, dc) <= 1
    else:
        mask = allowed(*grid)
    assert not bool(mask.all())  # the policy restricts something on this grid
    expected = _masked_reference(q, k, v, image, text, mask)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    full, _ = reference_attention(q, k, v)
    torch.testing.assert_close(out[:, :, text], full[:, :, text], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("text_first", [False, True], ids=["image-text", "text-image"])
@pytest.mark.parametrize("shift", ["none", "alternate"])
def test_proxy_joint_reference(text_first, shift):
    """Proxy attention in joint attention: each image query's one softmax runs over its window, the
    window-mean proxies (+log count) and every text key; text rows are full attention."""
    grid, window = (6, 8), (3, 4)
    config = ProxyAttention(window=window, shift=shift, swin_mask=False)
    q, k, v, image, text = _joint(text_first, grid)
    out = joint_policy_attention(config, _state(config), q, k, v, grid=grid, text_first=text_first, layer_index=0)
    qi, ki, vi = q[:, :, image], k[:, :, image], v[:, :, image]
    kp, counts = window_proxies(ki, *grid, window)
    vp, _ = window_proxies(vi, *grid, window)
    keys = torch.cat([ki, kp, k[:, :, text]], dim=2)
    values = torch.cat([vi, vp, v[:, :, text]], dim=2)
    local = _window_allowed(*grid, (2, 2))
    bias = torch.cat([
        torch.zeros(48, 48).masked_fill(~local, float("-inf")),
        counts.log().double().expand(48, -1),
        torch.zeros(48, 5, dtype=torch.float64),
    ], dim=1)
    expected, _ = reference_attention(qi, keys, values, mask=bias)
    torch.testing.assert_close(out[:, :, image], expected, rtol=1e-9, atol=1e-9)
    full, _ = reference_attention(q, k, v)
    torch.testing.assert_close(out[:, :, text], full[:, :, text], rtol=1e-9, atol=1e-9)


def test_full_window_is_stock_joint_attention():
    """One window over the whole grid, no shift: the policy path equals plain joint attention."""
    config = WindowAttention(windows=(1, 1), shift="none")
    q, k, v, _, _ = _joint(True, (5, 7))
    out = joint_policy_attention(config, _state(config, grid=(5, 7)), q, k, v, grid=(5, 7), text_first=True)
    full, _ = reference_attention(q, k, v)
    torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-9)


# ---- on the pipelines ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(POLICIES))
def test_apply_changes_output_and_remove_is_bit_exact(pipe, name):
    before = generate(pipe)
    handle = attnctrl.apply(pipe, POLICIES[name])
    try:
        processors = pipe.transformer.attn_processors
        joint = [p for n, p in processors.items() if isinstance(p, JointPolicyProcessor)]
        assert joint and all(p.policy.state is handle.state for p in joint)
        policy_out = generate(pipe)
    finally:
        assert attnctrl.remove(pipe)
    after = generate(pipe)
    assert torch.isfinite(policy_out).all()
    assert not torch.equal(policy_out, before)
    assert torch.equal(after, before)  # bit-exact restore
    assert not any(isinstance(p, (JointPolicyProcessor, PolicyProcessor)) for p in pipe.transformer.attn_processors.values())


def test_sd35_attn2_layers_take_the_generic_policy(sd3):
    with attnctrl.apply(sd3, WindowAttention()):
        processors = sd3.transformer.attn_processors
        assert isinstance(processors["transformer_blocks.0.attn2.processor"], PolicyProcessor)
        assert isinstance(processors["transformer_blocks.0.attn.processor"], JointPolicyProcessor)


def _first_block_attention(pipe, config=None):
    """(image stream, text stream) outputs of the first joint block's attention for one transformer call."""
    captured = {}
    attn = pipe.transformer.transformer_blocks[0].attn
    hook = attn.register_forward_hook(lambda m, a, kw, out: captured.setdefault("out", out), with_kwargs=True)
    try:
        if config is None:
            generate(pipe)
        else:
            with attnctrl.apply(pipe, config):
                generate(pipe)
    finally:
        hook.remove()
    return captured["out"]


@pytest.mark.parametrize("name", ["window", "proxy", "grouped"])
def test_only_image_queries_change_in_the_first_block(pipe, name):
    """Block 0 of the first call sees identical inputs with and without the policy, so its text stream
    (text queries: full attention) must equal stock while its image stream differs."""
    image_stock, text_stock = _first_block_attention(pipe)
    image_policy, text_policy = _first_block_attention(pipe, POLICIES[name])
    torch.testing.assert_close(text_policy, text_stock, rtol=1e-5, atol=1e-6)
    assert (image_policy - image_stock).abs().max() > 1e-4


def test_whole_grid_window_equals_stock_pipeline(pipe):
    """RoPE, token order and the text part are exact: a policy that allows every image key reproduces
    the stock generation (up to summation order)."""
    before = generate(pipe)
    with attnctrl.apply(pipe, WindowAttention(windows=(1, 1), shift="none")):
        same = generate(pipe)
    torch.testing.assert_close(same, before, rtol=1e-4, atol=1e-5)


def test_agent_attention_refused_with_the_alternatives(pipe):
    with pytest.raises(UnsupportedModelError, match="WindowAttention.*ProxyAttention.*GroupedAttention"):
        attnctrl.apply(pipe, attnctrl.AgentAttention())
    assert not attnctrl.remove(pipe)


def test_layers_filter_and_step_window(sd3):
    handle = attnctrl.apply(sd3, WindowAttention(layers=("transformer_blocks.1.",), steps=(0.0, 0.5)))
    try:
        processors = sd3.transformer.attn_processors
        assert isinstance(processors["transformer_blocks.1.attn.processor"], JointPolicyProcessor)
        assert not isinstance(processors["transformer_blocks.0.attn.processor"], JointPolicyProcessor)
    finally:
        handle.remove()
    with pytest.raises(UnsupportedModelError, match="matches no attention layer"):
        attnctrl.apply(sd3, WindowAttention(layers=("down_blocks.0",)))


# ---- under Prompt-to-Prompt --------------------------------------------------------------------------
def test_policy_under_prompt_to_prompt(pipe):
    """attnctrl.control over an applied policy on a stock pipeline: the edit runs on the policy's
    attention, the source row is the policy-only source generation (not the stock one), leaving the
    block keeps the policy, and remove restores stock."""
    plain = stock(pipe)
    stock_source = generate(plain)
    with attnctrl.apply(plain, WindowAttention(shift="none")):
        policy_source = generate(plain)
        with attnctrl.control(plain, Replace(), PROMPTS, max_sequence_length=12) as session:
            edited = generate(plain, PROMPTS)
        assert session.attention is not None
        assert isinstance(plain.transformer.attn_processors["transformer_blocks.0.attn.processor"], JointPolicyProcessor)
    assert torch.isfinite(edited).all()
    torch.testing.assert_close(edited[:1], policy_source, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(edited[:1], stock_source, atol=1e-4)
    assert generate(plain).equal(stock_source)


def stock(pipe):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if isinstance(pipe, FluxPipeline) else StableDiffusion3Pipeline
    out = cls(**pipe.components)
    out.set_progress_bar_config(disable=True)
    return out


def test_policy_under_the_prompt_to_prompt_pipeline(pipe):
    with attnctrl.apply(pipe, GroupedAttention(group=2)):
        out = pipe(
            PROMPTS, edit=Replace(), num_inference_steps=STEPS, height=32, width=32, output_type="latent",
            generator=torch.Generator().manual_seed(1), max_sequence_length=12,
        )
    assert torch.isfinite(out.images).all()


def test_materialise_refused_under_a_policy(sd3):
    plain = stock(sd3)
    with attnctrl.apply(plain, WindowAttention()):
        with pytest.raises(attnctrl.errors.InvalidOptionError, match="materialise"):
            with attnctrl.control(plain, Replace(), PROMPTS, materialise=True, max_sequence_length=12):
                generate(plain, PROMPTS)


# ---- precision and devices ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["window", "proxy", "grouped"])
def test_half_precision_finite(pipe, dtype, name):
    transformer = pipe.transformer
    config = POLICIES[name]
    state = PolicyState(config, patch_size=1)
    with attnctrl.apply(transformer, config) as handle:
        handle.state.clock.tick(torch.tensor(1.0), step=0, num_steps=1)
        out = _transformer_call(pipe, dtype)
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    del state


def _transformer_call(pipe, dtype, device="cpu"):
    """One forward of the pipeline's transformer in ``dtype`` on ``device`` with random inputs (8x8 tokens)."""
    from diffusers import FluxPipeline

    transformer = pipe.transformer
    g = torch.Generator().manual_seed(0)
    moved = transformer.to(device=device, dtype=dtype)
    try:
        if isinstance(pipe, FluxPipeline):
            cfg = transformer.config
            ids = torch.zeros(8, 8, 3)
            ids[..., 1] = torch.arange(8)[:, None]
            ids[..., 2] = torch.arange(8)[None, :]
            kwargs = dict(
                hidden_states=torch.randn(1, 64, cfg.in_channels, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, 12, cfg.joint_attention_dim, generator=g).to(device, dtype),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
                timestep=torch.tensor([0.5]).to(device, dtype), guidance=torch.tensor([3.5]).to(device, dtype),
                img_ids=ids.reshape(64, 3), txt_ids=torch.zeros(12, 3),
            )
        else:
            cfg = transformer.config
            kwargs = dict(
                hidden_states=torch.randn(1, cfg.in_channels, 16, 16, generator=g).to(device, dtype),
                encoder_hidden_states=torch.randn(1, 28, cfg.joint_attention_dim, generator=g).to(device, dtype),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
                timestep=torch.tensor([500.0]).to(device, dtype),
            )
        with torch.no_grad():
            return moved(**kwargs, return_dict=False)[0]
    finally:
        transformer.to(device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module", params=["sd3.5-medium fp16", "flux-dev bf16"])
def meta_pipe(request, tokenizer, t5_tokenizer):
    """B's real-config SD3.5-medium / Flux.1-dev transformers on 'meta' (tests/test_mmdit_meta.py)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

    if request.param.startswith("sd3"):
        pipe = build_sd3(tokenizer, t5_tokenizer, cls=StableDiffusion3Pipeline, layers=1)
        with torch.device("meta"):
            pipe.transformer = SD3Transformer2DModel(**SD35_MEDIUM).to(torch.float16)
    else:
        pipe = build_flux(tokenizer, t5_tokenizer, cls=FluxPipeline, double=1, single=1)
        with torch.device("meta"):
            pipe.transformer = FluxTransformer2DModel(**FLUX_DEV).to(torch.bfloat16)
    pipe.scheduler.set_timesteps(10)
    return pipe


META_POLICIES = {
    "window-swin": WindowAttention(swin_mask=True),
    "proxy": ProxyAttention(),
    "grouped-routing": GroupedAttention(group=8, implementation="routing"),
    "grouped-gather": GroupedAttention(group=(8, 16), pattern="criss-cross", implementation="gather"),
}


@pytest.mark.parametrize("name", sorted(META_POLICIES))
def test_meta_device_dry_run(meta_pipe, name):
    """Real-config SD3.5-medium (fp16) and Flux.1-dev (bf16) transformers on 'meta' at 512x768 with a
    policy, alone and under Prompt-to-Prompt: nothing in the policy path creates a tensor off the
    inputs' device or reads a value back (meta tensors have none)."""
    flux = hasattr(meta_pipe.transformer, "single_transformer_blocks")
    rows = len(PROMPTS) if flux else 2 * len(PROMPTS)
    with attnctrl.apply(meta_pipe, META_POLICIES[name]) as handle:
        out = meta_forward(meta_pipe, rows)
        assert out.device.type == "meta" and handle.state.active
        with attnctrl.control(meta_pipe, Replace(), PROMPTS, max_sequence_length=META_T5, structure=attnctrl.ImageQK(steps=1.0)):
            out = meta_forward(meta_pipe, rows)
        assert out.device.type == "meta"


# ---- CLI and app -----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["sd3", "flux"])
def model_dir(request, tokenizer, t5_tokenizer, tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if request.param == "sd3":
        pipe = build_sd3(tokenizer, t5_tokenizer, cls=StableDiffusion3Pipeline, layers=1)
    else:
        pipe = build_flux(tokenizer, t5_tokenizer, cls=FluxPipeline, double=1, single=1)
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    pipe.save_pretrained(path)
    return str(path)


def test_cli_speed_on_mmdit(model_dir, tmp_path, capsys):
    import json

    from attnctrl import cli

    out = tmp_path / "speed"
    code = cli.main([
        "speed", "--model", model_dir, "--prompt", PROMPTS[0], "--steps", "2", "--size", "32x32", "--out", str(out),
        "--efficient", "window", "--efficient", "grouped:group=2", "--efficient", "proxy:window=4",
    ])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "speed.json").read_text())
    assert [r["policy"] for r in record["runs"]] == ["stock", "window", "grouped", "proxy"]
    code = cli.main(["speed", "--model", model_dir, "--prompt", PROMPTS[0], "--steps", "2", "--size", "32x32",
                     "--out", str(tmp_path / "agent"), "--efficient", "agent"])
    assert code != 0 and "ProxyAttention" in capsys.readouterr().err


def test_app_speed_on_mmdit(model_dir):
    from attnctrl.app import actions
    from attnctrl.app.models import ModelCache

    model = ModelCache(device="cpu", dtype="fp32").get(model_dir)
    result = actions.run_speed(model, PROMPTS[0], [WindowAttention()], seed=1, steps=2, guidance=3.5, size=(32, 32))
    assert len(result.images) == 2 and "window" in result.table
