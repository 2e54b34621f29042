"""Device discipline, caught without a GPU.

Every edit and every efficient-attention policy is installed through the public API on SD 1.5- and
SDXL-shaped UNets (the real configs) whose weights and inputs live on PyTorch's ``meta`` device,
and the UNet forward must run. A tensor made on the CPU in the attention path meets a meta tensor
and fails, as it would meet a CUDA tensor on a GPU; a host read-back (``.item()``, ``bool(t)``,
``.tolist()``) of a meta tensor fails as well. Nothing is allocated: the full-size models cost no
memory here. Then ``torch.compile`` runs a UNet with Prompt-to-Prompt installed, on the CPU.
"""

from __future__ import annotations

import pytest
import torch

import attnctrl
from attnctrl import LocalBlend, Refine, Replace, Reweight
from attnctrl.consistency import ConsiStory, ConsistentSelfAttention
from attnctrl.pipelines.consistency import consistent_self_attention, subject_shared_attention

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
    projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
)
PROMPTS = ["a photo of a cat on the grass", "a photo of a dog on the grass"]
LATENT = 64  # 512x512 (SD 1.5) / SDXL at 512x512: every level, several cross-attention grids

EDITS = {
    "store only": None,
    "replace": Replace(),
    "refine": Refine(),
    "reweight": Reweight({"dog": 2.0}),
    "reweight over replace": Reweight({"dog": -1.0}, base=Replace()),
    "replace + local blend": Replace(blend=LocalBlend(("cat", "dog"))),
    "refine + local blend, subtract": Refine(blend=LocalBlend(("cat", "dog"), subtract=("grass",))),
    "kv injection": attnctrl.KVInjection(steps=(0.0, 1.0), layers=0.0),
    "kv injection, mask-guided": attnctrl.KVInjection(steps=(0.0, 1.0), layers=0.0, mask_words=("cat", "dog")),
    "kv injection over replace + local blend": attnctrl.KVInjection(
        steps=(0.0, 1.0), layers=(3, 5), base=Replace(self_steps=1.0, blend=LocalBlend(("cat", "dog")))
    ),
}
POLICIES = {
    "agent": attnctrl.AgentAttention(),
    "window": attnctrl.WindowAttention(),
    "proxy": attnctrl.ProxyAttention(),
    "grouped": attnctrl.GroupedAttention(),
}
KINDS = {"sd15": (SD15_UNET, torch.float16), "sdxl": (SDXL_UNET, torch.bfloat16)}


@pytest.fixture(scope="module", params=sorted(KINDS))
def meta_pipe(request, tokenizer):
    """A tiny real pipeline (tokenizer, scheduler) whose UNet is the full-size one, on ``meta``."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from conftest import build_sd

    config, dtype = KINDS[request.param]
    pipe = build_sd(tokenizer, cls=StableDiffusionPipeline)
    with torch.device("meta"):
        pipe.unet = UNet2DConditionModel(**config).to(dtype)
    pipe.scheduler.set_timesteps(10)
    pipe.meta_kind = request.param
    return pipe


def forward(pipe, rows: int, step: int = 2) -> torch.Tensor:
    """One UNet call on meta inputs; the timestep is a host value (its value picks the step)."""
    unet = pipe.unet
    dtype = unet.dtype
    sample = torch.empty(rows, 4, LATENT, LATENT, device="meta", dtype=dtype)
    text = torch.empty(rows, 16, unet.config.cross_attention_dim, device="meta", dtype=dtype)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.empty(rows, 1280, device="meta", dtype=dtype),
            "time_ids": torch.empty(rows, 6, device="meta", dtype=dtype),
        }
    out = unet(sample, pipe.scheduler.timesteps[step], encoder_hidden_states=text, **extra).sample
    assert out.device.type == "meta" and out.shape == sample.shape and out.dtype == dtype
    return out


@pytest.mark.parametrize("materialise", [False, True], ids=["fused", "materialised"])
@pytest.mark.parametrize("edit", list(EDITS.values()), ids=list(EDITS))
def test_every_edit_runs_on_meta(meta_pipe, edit, materialise):
    with attnctrl.control(meta_pipe, edit, PROMPTS, materialise=materialise) as session:
        for step in (0, 1, 2, 3):  # inside and outside the self window, with and without blending
            forward(meta_pipe, rows=2 * len(PROMPTS), step=step)
            if edit is not None and getattr(edit, "blend", None) is not None:
                latents = torch.empty(len(PROMPTS), 4, LATENT, LATENT, device="meta", dtype=meta_pipe.unet.dtype)
                out = session.step_end(meta_pipe, step, None, {"latents": latents})["latents"]
                assert out.device.type == "meta" and out.shape == latents.shape
        assert session.attention.resolutions()


@pytest.mark.parametrize("with_p2p", [False, True], ids=["alone", "under-p2p"])
@pytest.mark.parametrize("policy", list(POLICIES.values()), ids=list(POLICIES))
def test_every_policy_runs_on_meta(meta_pipe, policy, with_p2p):
    with attnctrl.apply(meta_pipe, policy):
        if with_p2p:
            with attnctrl.control(meta_pipe, Replace(blend=LocalBlend(("cat", "dog"))), PROMPTS):
                forward(meta_pipe, rows=2 * len(PROMPTS))
        else:
            forward(meta_pipe, rows=2)
    assert not any(type(p).__module__.startswith("attnctrl") for p in meta_pipe.unet.attn_processors.values())


def test_consistency_presets_run_on_meta(meta_pipe):
    with consistent_self_attention(meta_pipe, ConsistentSelfAttention()):
        for step in (0, 5):
            forward(meta_pipe, rows=4, step=step)
    # ConsiStory's subject masks are Otsu thresholds of the maps of the steps before, read back to the
    # host once per step (never per call); a meta dry run has no values, so it covers the first step,
    # whose layers record maps and run without masks.
    with subject_shared_attention(meta_pipe, ConsiStory(), ["cat", "dog"], prompts=["a cat on the grass", "a dog on the grass"]):
        forward(meta_pipe, rows=4, step=0)


def test_fused_p2p_coefficients_follow_the_device():
    """The crash of the first GPU run: fused coefficients were moved to the dtype, not the device."""
    from attnctrl.p2p import RowLayout, edited_attention
    from attnctrl.plan import CrossStep

    length = 8
    alpha = torch.ones(1, length)
    cross = CrossStep("replace", torch.eye(length)[None], torch.ones(1, length), None, None, alpha, identity=False)
    q = torch.empty(4, 2, 16, 8, device="meta", dtype=torch.float16)
    k = torch.empty(4, 2, length, 8, device="meta", dtype=torch.float16)
    out, probs = edited_attention(q, k, k, layout=RowLayout.from_batch(4, 2), cross=cross, want_probs=True)
    assert out.device.type == "meta" and probs.device.type == "meta"


def test_probability_columns_on_the_device_are_checked_without_a_host_read():
    from attnctrl.kernels import attention_with_probs

    q = torch.empty(1, 2, 16, 8, device="meta")
    out, probs = attention_with_probs(q, q, q, columns=torch.tensor([0, 15], device="meta"))
    assert probs.shape == (1, 2, 16, 2) and probs.device.type == "meta"


def test_compiled_unet_with_p2p_matches_eager(tokenizer):
    """``torch.compile(unet)`` with Prompt-to-Prompt installed runs on the CPU and gives the eager
    result over several steps (inside and outside the edit windows). ``aot_eager`` traces the graphs
    with fake tensors through AOTAutograd, as inductor does, without the C++ build that would make
    this test take minutes; the host-side step bookkeeping and backend selection run eagerly."""
    from conftest import build_sd

    pipe = build_sd(tokenizer)
    pipe.scheduler.set_timesteps(4)
    sample = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a cat on the grass", "a dog on the grass"]
    unet = pipe.unet
    steps = range(4)
    with attnctrl.control(pipe, Replace(cross_steps=0.5, self_steps=0.3), prompts) as session:
        eager = [unet(sample, pipe.scheduler.timesteps[s], encoder_hidden_states=text).sample for s in steps]
        eager_maps = session.attention.maps()
    torch._dynamo.reset()
    try:
        with attnctrl.control(pipe, Replace(cross_steps=0.5, self_steps=0.3), prompts) as session:
            compiled = torch.compile(unet, backend="aot_eager")
            outs = [compiled(sample, pipe.scheduler.timesteps[s], encoder_hidden_states=text).sample for s in steps]
            compiled_maps = session.attention.maps()
    finally:
        torch._dynamo.reset()
    for a, b in zip(eager, outs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_maps, eager_maps, atol=1e-6, rtol=1e-5)


def test_step_clock_reads_schedule_views_without_a_device_read(monkeypatch):
    """Pipelines pass ``t`` from ``for t in scheduler.timesteps`` (maybe expanded to the batch): the
    clock finds its step from the host copy of the schedule, never reading the (device) timestep;
    Heun-style repeated schedules map to the distinct step; other timesteps are still read."""
    from types import SimpleNamespace

    import attnctrl.clock as clock

    scheduler = SimpleNamespace(timesteps=torch.tensor([999.0, 749.0, 749.0, 499.0, 499.0, 0.0]))
    tick_clock = clock.StepClock(scheduler)
    real_read = clock._timestep_value

    def no_read(timestep):
        raise AssertionError("the timestep was read back")

    monkeypatch.setattr(clock, "_timestep_value", no_read)
    steps = []
    for t in scheduler.timesteps:
        tick_clock.tick(t.expand(4))
        steps.append((tick_clock.step, tick_clock.num_steps))
    assert steps == [(0, 4), (1, 4), (1, 4), (2, 4), (2, 4), (3, 4)]
    monkeypatch.setattr(clock, "_timestep_value", real_read)
    tick_clock.tick(torch.tensor(749.0))  # not a view of the schedule: read as before
    assert tick_clock.step == 1
