"""Dynamic Prompt Learning (Wang et al., NeurIPS 2023) on top of null-text inversion.

After a plain inversion, a noun's cross-attention often leaks onto the background and onto the other
objects, so a word swap edits the wrong region. DPL learns, at every timestep, new input embeddings
for the noun tokens of the source prompt so that their cross-attention maps are (1) strong
somewhere (attention balancing, the Attend-and-Excite loss), (2) disjoint from each other (mean
pairwise cosine similarity) and (3) off the background (cosine similarity with a background mask);
the losses are weighted (1.0, 0.05, 0.05). Per step ``i`` it runs at most 21 AdamW iterations (lr 1e-3,
weight decay 0.01, a fresh optimiser per step) and stops once the losses are below the decaying
thresholds ``0.3 e^(-i/25)``, ``0.9 e^(-i/25)`` and ``0.7 e^(-i/50)``; then it optimises the null-text
embedding of that step with the learned source embedding (the null-text rules of
:func:`attnctrl.pipelines.inversion.null_text_step`) and advances.

The background comes from the user (``background_mask``) or is estimated as DPL does: KMeans (5
clusters, 10 restarts) on the self-attention rows of the finest layer with at most 32x32 tokens,
averaged over the DDIM inversion; a cluster belongs to a noun when that noun's normalised
cross-attention averages more than 0.2 over it, and the clusters that belong to no noun are the
background.

The maps are read, with gradients, through the kernel layer's reference path on the map-resolution
cross-attention layers only; every other layer keeps its fused kernel.

Nouns: given with ``words=``, or found by :func:`find_nouns`. When another word (an adjective)
outweighs a noun at every pixel, the balancing loss is saturated and has no gradient; DPL then
lowers only the other two losses and warns, suggesting ``words=`` with the words that carry the
objects.

Differences from the official code, on purpose: the null-text part uses our null-text schedule (at
most ``inner_steps`` iterations with early stopping) instead of a fixed 51 iterations; the noun
embeddings of a step start from the previous step's; the source embeddings are stored after the text
encoder, so editing needs no tokenizer changes. SDXL is not supported yet (two text encoders).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from attnctrl.errors import InvalidOptionError, UnsupportedModelError, WordNotFoundError
from attnctrl.processors import install, restore
from attnctrl.processors.maps import AttentionMapProcessor, MapRecorder
from attnctrl.store import pick_resolution
from attnctrl.tokens import PromptTokens, normalize_word, tokenize_prompt

from ._denoiser import Denoiser, PromptEmbeddings

__all__ = ["find_nouns", "dpl_losses", "attention_losses", "estimate_background", "kmeans", "LOSS_WEIGHTS"]

LOSS_WEIGHTS = (1.0, 0.05, 0.05)
"""(attention balancing, disjoint objects, background leakage)."""

# Attend-and-Excite sharpens the word softmax by 100: once another word leads a noun by about 0.05
# in attention probability at every pixel, the balancing loss sits within 1% of 1 and its gradient
# vanishes, so no number of iterations moves it.
_SATURATED = 0.99

_FUNCTION_WORDS = frozenset(
    """a an the this that these those some any each every no one two three four five several many
    and or but nor with without of on in at by for from to into onto over under above below behind beside
    near next between among against along across around through toward towards inside outside
    is are was were be been being there here it its their his her my your our who which while
    very quite""".split()
)
_PLACE_WORDS = frozenset(
    """left right top bottom centre center middle corner side front back background foreground
    image picture photo photograph scene view""".split()
)


def find_nouns(prompt: str) -> list[str]:
    """The nouns DPL learns when none are given.

    Rule (no tagger needed): split the prompt at function words (articles, numerals, prepositions,
    conjunctions, forms of "to be", "there"); the last word of each remaining phrase is its head noun.
    Place and framing words (left, right, top, bottom, centre, corner, side, background, image,
    photo, ...) are dropped. "a small red circle and a blue square on a white background" ->
    ["circle", "square"]. Pass ``words=`` to choose yourself.
    """
    nouns: list[str] = []
    phrase: list[str] = []
    for raw in prompt.split() + ["."]:
        word = normalize_word(raw)
        ends = raw.rstrip().endswith((",", ".", ";", ":", "!", "?"))
        if word and word not in _FUNCTION_WORDS:
            phrase.append(word)
        if (not word or word in _FUNCTION_WORDS or ends) and phrase:
            head = phrase[-1]
            if head not in _PLACE_WORDS and head not in nouns:
                nouns.append(head)
            phrase = []
    return nouns


def _gaussian_3x3(maps: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """(n, h, w) smoothed with a 3x3 Gaussian (reflect padding, as Attend-and-Excite)."""
    x = torch.arange(3, dtype=maps.dtype, device=maps.device) - 1
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]
    padded = F.pad(maps[:, None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel)[:, 0]


def dpl_losses(
    maps: torch.Tensor, positions: Sequence[Sequence[int]], end: int, background: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPL's three losses for one image.

    Args:
        maps: (h, w, L) cross-attention probabilities (head- and layer-averaged).
        positions: token positions of each noun (a noun of several tokens is their mean).
        end: position of the end-of-text token (the text tokens are ``1 .. end - 1``).
        background: (h, w) background mask in [0, 1], or None.

    Returns scalar tensors (L_at, L_dj, L_bg): attention balancing = max over nouns of
    ``1 - max(smoothed softmax(100 * A[1:end]))``, disjointness = mean pairwise cosine similarity of
    the noun maps, background leakage = mean cosine similarity of each noun map with the background.
    """
    h, w, _ = maps.shape
    text = torch.softmax(maps[..., 1:end] * 100.0, dim=-1)
    balanced = torch.stack([text[..., [p - 1 for p in pos]].mean(-1) for pos in positions])  # (n, h, w)
    smoothed = _gaussian_3x3(balanced) if h >= 2 and w >= 2 else balanced
    l_at = (1.0 - smoothed.flatten(1).max(1).values).max()
    raw = torch.stack([maps[..., list(pos)].mean(-1) for pos in positions]).flatten(1)  # (n, h*w)
    zero = maps.sum() * 0.0
    if raw.shape[0] > 1:
        sims = F.cosine_similarity(raw[:, None], raw[None, :], dim=-1, eps=1e-8)
        i, j = torch.triu_indices(raw.shape[0], raw.shape[0], offset=1)
        l_dj = sims[i, j].mean()
    else:
        l_dj = zero
    if background is not None and float(background.sum()) > 0:
        bg = background.to(raw).flatten()[None]
        l_bg = F.cosine_similarity(raw, bg, dim=-1, eps=1e-8).mean()
    else:
        l_bg = zero
    return l_at, l_dj, l_bg


def kmeans(x: torch.Tensor, k: int, *, restarts: int = 10, iterations: int = 100, seed: int = 0) -> torch.Tensor:
    """Labels (N,) of KMeans on the rows of ``x`` (N, F): k-means++ seeding from a private generator,
    ``restarts`` runs, the lowest inertia kept."""
    x = x.double()
    n = x.shape[0]
    k = min(k, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = [x[int(torch.randint(n, (1,), generator=gen))]]
        for _ in range(1, k):
            d = torch.cdist(x, torch.stack(centres)).min(1).values.pow(2)
            total = float(d.sum())
            pick = int(torch.multinomial((d / total).cpu(), 1, generator=gen)) if total > 0 else int(torch.randint(n, (1,), generator=gen))
            centres.append(x[pick])
        c = torch.stack(centres)
        labels = torch.zeros(n, dtype=torch.long)
        for _ in range(iterations):
            new = torch.cdist(x, c).argmin(1)
            if torch.equal(new, labels) and _ > 0:
                break
            labels = new
            for j in range(k):
                members = x[labels == j]
                if len(members):
                    c[j] = members.mean(0)
        inertia = float((x - c[labels]).pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels.clone(), inertia
    return best  # type: ignore[return-value]


def estimate_background(
    self_attention: torch.Tensor,
    self_grid: tuple[int, int],
    noun_maps: torch.Tensor,
    *,
    clusters: int = 5,
    threshold: float = 0.2,
    seed: int = 0,
) -> torch.Tensor:
    """DPL's background estimate for one image.

    Args:
        self_attention: (N, N) averaged self-attention at ``self_grid`` (N = h * w).
        noun_maps: (n, h', w') averaged cross-attention of each noun at the map resolution.

    Returns (h', w') float mask in [0, 1] (1 = background) at the map resolution.
    """
    h, w = self_grid
    labels = kmeans(self_attention.float(), clusters, seed=seed).to(noun_maps.device)
    normalised = noun_maps / noun_maps.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    up = F.interpolate(normalised[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)[:, 0].flatten(1)
    background = torch.ones(h * w, device=noun_maps.device)
    for c in range(int(labels.max()) + 1):
        member = labels == c
        if bool((up[:, member].mean(1) > threshold).any()):
            background[member] = 0.0
    target = noun_maps.shape[-2:]
    return F.adaptive_avg_pool2d(background.reshape(1, 1, h, w), target)[0, 0]


@dataclass
class DPLResult:
    trajectory: torch.Tensor
    null: torch.Tensor
    source: torch.Tensor
    stats: dict[str, Any]
    words: tuple[str, ...]


def _self_grid(latent_hw: tuple[int, int], levels: int) -> tuple[int, int]:
    h, w = latent_hw
    for level in range(levels):
        f = 2**level
        grid = (math.ceil(h / f), math.ceil(w / f))
        if grid[0] * grid[1] <= 32 * 32:
            return grid
    return (math.ceil(h / 2 ** (levels - 1)), math.ceil(w / 2 ** (levels - 1)))


class _TokenEmbeddings:
    """Learned input embeddings for chosen token positions of each prompt, fed to the text encoder
    through a forward hook on its token-embedding table (the table itself is never changed)."""

    def __init__(self, pipe: Any, tokens: list[PromptTokens], positions: list[list[list[int]]], device: torch.device) -> None:
        self.encoder = pipe.text_encoder
        tok = pipe.tokenizer
        self.ids = tok([t.prompt for t in tokens], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
        table = self.encoder.get_input_embeddings()
        self.slots = [sorted({p for noun in per_image for p in noun}) for per_image in positions]
        self.params = [
            table(self.ids[i, slots]).detach().float().clone().requires_grad_(True) for i, slots in enumerate(self.slots)
        ]
        self._table = table

    def encode(self, images: Sequence[int] | None = None) -> torch.Tensor:
        """(len(images), L, D) text-encoder output with the learned embeddings in place."""
        images = list(range(len(self.params))) if images is None else list(images)

        def hook(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for row, i in enumerate(images):
                out[row, self.slots[i]] = self.params[i].to(out.dtype)
            return out

        handle = self._table.register_forward_hook(hook)
        try:
            return self.encoder(self.ids[images])[0].float()
        finally:
            handle.remove()


def dynamic_prompt_learning(
    den: Denoiser,
    pipe: Any,
    prompts: list[str],
    encoded: torch.Tensor,
    timesteps: torch.Tensor,
    embeddings: PromptEmbeddings,
    *,
    guidance_scale: float,
    inner_steps: int,
    schedule: str,
    words: Sequence[str] | None,
    background_mask: torch.Tensor | None,
    bar: Any,
    token_steps: int = 21,
    lr: float = 1e-3,
) -> DPLResult:
    """The DPL inversion of :func:`attnctrl.pipelines.invert` (``method="dpl"``)."""

    from .ddim import ddim_trajectory, null_text_step

    if den.is_xl:
        raise UnsupportedModelError("Dynamic Prompt Learning supports Stable Diffusion 1.x/2.x pipelines; SDXL (two text encoders) is not supported yet")
    m = len(prompts)
    tokens = [tokenize_prompt(pipe.tokenizer, p) for p in prompts]
    chosen = [list(words) for _ in prompts] if words is not None else [find_nouns(p) for p in prompts]
    for p, nouns in zip(prompts, chosen):
        if not nouns:
            raise WordNotFoundError(f"no nouns found in {p!r} for Dynamic Prompt Learning; pass words=[...] with the objects to learn")
    positions = [[t.positions_of(word) for word in nouns] for t, nouns in zip(tokens, chosen)]
    latent_hw = tuple(encoded.shape[-2:])
    levels = len(pipe.unet.config.block_out_channels)
    self_grid = _self_grid(latent_hw, levels)  # type: ignore[arg-type]
    recorder = MapRecorder(latent_hw=latent_hw, cross_resolutions=None, self_resolution=self_grid if background_mask is None else None)  # type: ignore[arg-type]
    sums: dict[tuple[int, int], torch.Tensor] = {}

    def fold() -> None:
        for grid, maps in recorder.cross.items():
            total = torch.stack(maps).detach().mean(0)
            sums[grid] = total if grid not in sums else sums[grid] + total
        recorder.clear_cross()

    install(pipe.unet, lambda name, module: AttentionMapProcessor(recorder, name))
    try:
        trajectory = ddim_trajectory(den, encoded, timesteps, embeddings, bar=None, after_call=fold)
        map_grid = pick_resolution(sorted(sums), latent_hw)  # type: ignore[arg-type]
        h, w = map_grid
        averaged = sums[map_grid].reshape(m, h, w, -1)
        if background_mask is not None:
            bg = torch.as_tensor(background_mask, dtype=torch.float32)
            if bg.ndim == 2:
                bg = bg.expand(m, *bg.shape)
            if bg.ndim != 3 or bg.shape[0] != m:
                raise InvalidOptionError(f"background_mask must be (H, W) or ({m}, H, W), got {tuple(bg.shape)}")
            background = F.adaptive_avg_pool2d(bg[:, None].to(den.device), map_grid)[:, 0]
        else:
            self_mean = recorder.self_sum / max(recorder.self_count, 1)
            background = torch.stack([
                estimate_background(self_mean[i], self_grid, torch.stack([averaged[i][..., pos].mean(-1) for pos in positions[i]]))
                for i in range(m)
            ])
        recorder.self_resolution = None
        recorder.cross_resolutions = {map_grid}
        learned = _TokenEmbeddings(pipe, tokens, positions, den.device)
        z = trajectory[0].to(den.device)
        null_current = embeddings.uncond
        nulls, sources, step_losses, token_iterations, null_iterations, null_loss = [], [], [], [], [], []
        w = guidance_scale
        bar.update(len(timesteps))
        for k, t in enumerate(timesteps.tolist()):
            limits = (0.3 * math.exp(-k / 25), 0.9 * math.exp(-k / 25), 0.7 * math.exp(-k / 50))
            optimisers = [torch.optim.AdamW([p], lr=lr, weight_decay=0.01) for p in learned.params]
            active = list(range(m))
            first: list[list[float]] = [[] for _ in range(m)]
            last: list[list[float]] = [[] for _ in range(m)]
            iters = [0] * m
            for iteration in range(token_steps):
                if not active:
                    break
                recorder.enabled = True
                recorder.clear_cross()
                with torch.enable_grad():
                    cond = learned.encode(active)
                    den(z[active], t, cond, backward=True)
                    maps = recorder.cross_maps(map_grid)
                    totals, still = [], []
                    for row, i in enumerate(active):
                        l_at, l_dj, l_bg = dpl_losses(maps[row], positions[i], tokens[i].end, background[i])
                        values = [float(l_at.detach()), float(l_dj.detach()), float(l_bg.detach())]
                        if not first[i]:
                            first[i] = values
                        last[i] = values
                        if all(v < lim for v, lim in zip(values, limits)):
                            continue
                        iters[i] += 1
                        still.append(i)
                        totals.append(LOSS_WEIGHTS[0] * l_at + LOSS_WEIGHTS[1] * l_dj + LOSS_WEIGHTS[2] * l_bg)
                    if still and iteration < token_steps - 1:
                        grads = torch.autograd.grad(torch.stack(totals).sum(), [learned.params[i] for i in still])
                        for i, g in zip(still, grads):
                            learned.params[i].grad = g
                            optimisers[i].step()
                recorder.clear_cross()
                active = still
            recorder.enabled = False
            with torch.no_grad():
                cond = learned.encode()
            step = null_text_step(
                den, z, t, k, trajectory[k + 1].to(den.device), cond, null_current,
                guidance_scale=w, inner_steps=inner_steps, schedule=schedule,  # type: ignore[arg-type]
            )
            nulls.append(step.null)
            sources.append(cond)
            null_current = step.null
            z = step.next_latents
            step_losses.append({"first": first, "last": last})
            token_iterations.append(iters)
            null_iterations.append(step.iterations)
            null_loss.append(step.loss)
            bar.update(1)
    finally:
        restore(pipe.unet)
    for i in range(m):
        if all(losses["last"][i][0] >= _SATURATED for losses in step_losses):
            warnings.warn(
                f"Dynamic Prompt Learning could not balance the attention of {chosen[i]} in {prompts[i]!r}: at every step another word "
                f"outweighs one of them at every pixel (attention-balancing loss >= {_SATURATED}), which leaves that loss no gradient, "
                "so only the disjoint and background losses were lowered. In this model other words carry those objects; pass "
                "words=[...] with them (an adjective such as a colour) to balance those instead",
                stacklevel=3,
            )
    stats = {
        "map_resolution": list(map_grid),
        "background": background.cpu().tolist(),
        "dpl_losses": step_losses,
        "token_iterations": token_iterations,
        "iterations": null_iterations,
        "step_loss": null_loss,
        "words": chosen,
    }
    return DPLResult(trajectory, torch.stack(nulls), torch.stack(sources), stats, tuple(chosen[0]))


@torch.no_grad()
def attention_losses(
    pipe: Any,
    inversion: Any,
    words: Sequence[str],
    *,
    background_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Replay the reconstruction of ``inversion`` (image 0) and average DPL's three losses of the
    source prompt's maps over the steps: ``{"attention", "disjoint", "background", "background_mask"}``.

    Compares inversions by how well each noun's attention stays on its object (lower is better).
    The background is ``background_mask`` ((H, W), 1 = background) or, when None, the estimate
    DPL stored in the inversion's stats (for other methods: estimated here from the replay).
    """

    inv = inversion[0]
    den = Denoiser(pipe, height=inv.height, width=inv.width)
    prompt = inv.prompts[0]
    tokens = tokenize_prompt(pipe.tokenizer, prompt)
    positions = [tokens.positions_of(word) for word in words]
    emb = den.encode_prompts([prompt])
    timesteps = den.timesteps(inv.num_inference_steps)
    latent_hw = tuple(inv.latents.shape[-2:])
    levels = len(pipe.unet.config.block_out_channels)
    self_grid = _self_grid(latent_hw, levels)  # type: ignore[arg-type]
    recorder = MapRecorder(latent_hw=latent_hw, cross_resolutions=None, self_resolution=self_grid)  # type: ignore[arg-type]
    per_step: list[tuple[tuple[int, int], torch.Tensor]] = []
    install(pipe.unet, lambda name, module: AttentionMapProcessor(recorder, name))
    try:
        for k, t in enumerate(timesteps.tolist()):
            z = inv.latents[k].to(den.device).float()
            cond = emb.cond if inv.source_embeddings is None else inv.source_embeddings[k].to(den.device)
            recorder.clear_cross()
            den(z, t, cond)
            grid = pick_resolution(sorted(recorder.cross), latent_hw)  # type: ignore[arg-type]
            per_step.append((grid, recorder.cross_maps(grid)[0]))
    finally:
        restore(pipe.unet)
    grid = per_step[0][0]
    if background_mask is not None:
        background = F.adaptive_avg_pool2d(torch.as_tensor(background_mask, dtype=torch.float32)[None, None].to(den.device), grid)[0, 0]
    elif "background" in inv.stats:
        background = torch.tensor(inv.stats["background"][0], device=den.device)
    else:
        mean_maps = torch.stack([m for _, m in per_step]).mean(0)
        background = estimate_background(
            recorder.self_sum[0] / max(recorder.self_count, 1), self_grid, torch.stack([mean_maps[..., pos].mean(-1) for pos in positions])
        )
    totals = torch.zeros(3)
    for _, maps in per_step:
        totals += torch.tensor([float(v) for v in dpl_losses(maps, positions, tokens.end, background)])
    totals /= len(per_step)
    return {"attention": float(totals[0]), "disjoint": float(totals[1]), "background": float(totals[2]), "background_mask": background.cpu()}
