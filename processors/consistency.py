"""IR-Diffusion processors: isolation, reference (extended, repositioned) self-attention and masked
mutual cross-attention for the target rows of a batch laid out as ``[ref_1 .. ref_n, target]`` per
CFG half. Reference rows run plain attention, so they reproduce their rehearsal exactly.

Also the two batch-sharing presets: StoryDiffusion's consistent self-attention
(:class:`SharedSelfAttentionProcessor`) and ConsiStory's subject-driven shared attention
(:class:`SubjectSharedProcessor`, which also records the cross-attention its masks come from).

The routing of each call is a :class:`attnctrl.kernels.Routing` (group labels plus a small table);
the kernel layer executes it without a dense mask.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from attnctrl import kernels
from attnctrl.consistency import (
    ConsiStory,
    IRDiffusion,
    key_dropout,
    subject_mask,
    subject_routing_labels,
    group_labels,
    isolation_table,
    query_dropout,
    reference_table,
    reposition,
    resize_mask,
    resolve_overlaps,
)
from attnctrl.errors import PromptMismatchError
from attnctrl.kernels.routing import Routing
from attnctrl.store import resolution_of

from ._projection import output, project

__all__ = [
    "ConsistencyState",
    "ConsistencyProcessor",
    "SharedAttentionState",
    "SharedSelfAttentionProcessor",
    "SubjectSharedState",
    "SubjectSharedProcessor",
]


@dataclass
class ConsistencyState:
    """Per-generation state shared by every layer.

    Attributes:
        settings: the IR-Diffusion options.
        target_masks: (n, H, W) bool subject masks in the target image; reference_masks: (n, H, W)
            bool masks of subject ``i`` in reference ``i`` (any resolution: resized per layer).
        latent_hw: the latent grid of the current generation.
        gated: processor names of the blocks with reference attention.
        steps: number of denoising steps; step: the current one (set by the pipeline's hook).

    The batch holds ``rows_per_half = n + 1`` rows per CFG half; the target is the last of each.
    """

    settings: IRDiffusion
    target_masks: torch.Tensor
    reference_masks: torch.Tensor
    latent_hw: tuple[int, int]
    gated: frozenset[str]
    steps: int
    step: int = 0
    _cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def subjects(self) -> int:
        return int(self.target_masks.shape[0])

    @property
    def rows_per_half(self) -> int:
        return self.subjects + 1

    def masks_at(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, h, w) target and reference masks at ``grid`` (cached)."""
        key = ("masks", grid, str(device))
        if key not in self._cache:
            target = torch.stack([resize_mask(m, grid) for m in self.target_masks]).to(device)
            # a token claimed by two subjects after resizing goes to the smaller one
            self._cache[key] = (resolve_overlaps(target), torch.stack([resize_mask(m, grid) for m in self.reference_masks]).to(device))
        return self._cache[key]

    def query_labels(self, grid: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) target labels without and with this step's query dropout (drawn once per step and
        grid from a generator seeded by (seed, step, grid))."""
        key = ("labels", grid, self.step, str(device))
        if key not in self._cache:
            target, _ = self.masks_at(grid, device)
            labels = group_labels(target.flatten(1))
            seed = hash((int(self.settings.seed), int(self.step), grid)) % (2**63)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            dropped = query_dropout(labels.cpu(), self.subjects, float(self.settings.dropout), generator).to(device)
            self._cache = {k: v for k, v in self._cache.items() if not (k[0] == "labels" and k[2] != self.step)}
            self._cache[key] = (labels, dropped)
        return self._cache[key]


class ConsistencyProcessor:
    """One attention layer under IR-Diffusion. Shapes: ``hidden_states`` (batch, N, C) with batch
    ``(n + 1)`` or ``2 (n + 1)`` (CFG); ``encoder_hidden_states`` (batch, L, C_text) for
    cross-attention."""

    def __init__(self, state: ConsistencyState, name: str) -> None:
        self.state = state
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        call = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        state = self.state
        rows = call.query.shape[0]
        per_half = state.rows_per_half
        grid = resolution_of(call.query.shape[2], state.latent_hw)
        mode = None
        if grid is not None and rows % per_half == 0 and state.subjects > 0 and call.mask is None:
            if call.is_cross:
                mode = "mutual" if state.settings.mutual_cross > 0 else None
            elif state.settings.reference and self.name in state.gated and state.settings.gating.active(state.step, state.steps):
                mode = "reference"
            elif state.settings.isolate and state.subjects > 1:
                mode = "isolate"
        if mode is None:
            hidden = kernels.attention(call.query, call.key, call.value, scale=attn.scale, mask=call.mask)
            return output(attn, hidden, call)
        targets = list(range(per_half - 1, rows, per_half))
        others = [r for r in range(rows) if r not in targets]
        # reference rows: stock attention, computed once; target rows: the policy
        hidden = call.query.new_empty((*call.query.shape[:3], call.value.shape[-1]))
        hidden[others] = kernels.attention(call.query[others], call.key[others], call.value[others], scale=attn.scale)
        flat = hidden_states if hidden_states.ndim == 3 else hidden_states.flatten(2).transpose(1, 2)
        for t in targets:
            if mode == "mutual":
                hidden[t] = self._mutual_cross(attn, call, t, grid)
            elif mode == "reference":
                hidden[t] = self._with_references(attn, call, flat, t, grid)
            else:
                hidden[t] = self._isolated(attn, call, t, grid)
        return output(attn, hidden, call)

    # -- target rows ----------------------------------------------------------------------------
    def _isolated(self, attn: Any, call: Any, t: int, grid: tuple[int, int]) -> torch.Tensor:
        labels, _ = self.state.query_labels(grid, call.query.device)
        routing = Routing(
            query_groups=labels[None], key_groups=labels[None],
            table=isolation_table(self.state.subjects).to(call.query.device),
            validate=False,  # labels come from the subject masks: in range by construction
        )
        return kernels.attention(call.query[t : t + 1], call.key[t : t + 1], call.value[t : t + 1], scale=attn.scale, mask=routing)[0]

    def _with_references(self, attn: Any, call: Any, flat: torch.Tensor, t: int, grid: tuple[int, int]) -> torch.Tensor:
        state = self.state
        n = state.subjects
        device = call.query.device
        target_masks, reference_masks = state.masks_at(grid, device)
        labels, dropped = state.query_labels(grid, device)
        h, w = grid
        first_ref = t - n
        keys, values, key_labels = [], [], []
        for i in range(n):
            features = flat[first_ref + i].transpose(0, 1).reshape(-1, h, w)
            if state.settings.reposition == "none":
                moved = features * reference_masks[i].to(features.dtype)
                moved_mask = reference_masks[i]
            else:
                moved, moved_mask = reposition(
                    features, reference_masks[i], target_masks[i], keep_aspect=state.settings.reposition == "keep-aspect"
                )
            tokens = moved.flatten(1).transpose(0, 1)[None]  # (1, N, C)
            k, v = _key_value(attn, tokens, call.heads)
            keys.append(k)
            values.append(v)
            key_labels.append(torch.where(moved_mask.flatten(), n + 1 + i, 2 * n + 1))
        keys.append(call.key[t : t + 1])
        values.append(call.value[t : t + 1])
        key_labels.append(labels)
        table = reference_table(n, isolate=state.settings.isolate, reference_bias=state.settings.reference_bias).to(device)
        routing = Routing(query_groups=dropped[None], key_groups=torch.cat(key_labels)[None], table=table, validate=False)
        return kernels.attention(
            call.query[t : t + 1], torch.cat(keys, dim=2), torch.cat(values, dim=2), scale=attn.scale, mask=routing
        )[0]

    def _mutual_cross(self, attn: Any, call: Any, t: int, grid: tuple[int, int]) -> torch.Tensor:
        state = self.state
        lam = float(state.settings.mutual_cross)
        target_masks, _ = state.masks_at(grid, call.query.device)
        q = call.query[t : t + 1]
        own = kernels.attention(q, call.key[t : t + 1], call.value[t : t + 1], scale=attn.scale)[0]
        mixed = own.clone()
        first_ref = t - state.subjects
        for i in range(state.subjects):
            inside = target_masks[i].flatten()
            if not bool(inside.any()):
                continue
            r = first_ref + i
            subject = kernels.attention(q, call.key[r : r + 1], call.value[r : r + 1], scale=attn.scale)[0]
            mixed[:, inside] = (1 - lam) * own[:, inside] + lam * subject[:, inside]
        return mixed


def _key_value(attn: Any, tokens: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H, N, D) keys and values of ``tokens`` (1, N, C) with the layer's own projections."""
    key = attn.to_k(tokens)
    value = attn.to_v(tokens)
    head_dim = key.shape[-1] // heads
    key = key.view(1, -1, heads, head_dim).transpose(1, 2)
    value = value.view(1, -1, heads, value.shape[-1] // heads).transpose(1, 2)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    return key, value


@dataclass
class SharedAttentionState:
    """Per-generation state of :class:`SharedSelfAttentionProcessor`: the settings, the number of
    batch halves (2 with classifier-free guidance), the step index (set by the pipeline's hook) and
    the private generator the samples are drawn from."""

    settings: Any
    halves: int = 2
    step: int = 0
    steps: int = 1
    generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))

    def restart(self) -> None:
        self.generator.manual_seed(int(self.settings.seed))


class SharedSelfAttentionProcessor:
    """StoryDiffusion's consistent self-attention on one layer: each image of a CFG half attends to
    its own tokens plus the shared random sample of all images' tokens (see
    :class:`attnctrl.consistency.ConsistentSelfAttention`). Shapes: ``hidden_states`` (batch, N, C)
    with batch ``halves x images``."""

    def __init__(self, state: SharedAttentionState, name: str) -> None:
        self.state = state
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        from attnctrl.consistency import shared_routing_labels

        call = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        state = self.state
        rows, heads, n, d = call.query.shape
        probability = state.settings.use_probability(state.step, state.steps)
        images = rows // max(state.halves, 1)
        use = (
            not call.is_cross and call.mask is None and images > 1 and rows % state.halves == 0
            and probability > 0 and float(torch.rand((), generator=state.generator)) < probability
        )
        if not use:
            hidden = kernels.attention(call.query, call.key, call.value, scale=attn.scale, mask=call.mask)
            return output(attn, hidden, call)
        sampled = torch.rand(images * n, generator=state.generator) < float(state.settings.rate)
        query_labels, key_labels, table = shared_routing_labels(images, n, sampled)
        device = call.query.device
        # validated on the host, where it costs no device sync, then moved
        routing = Routing(query_groups=query_labels.reshape(1, -1), key_groups=key_labels[None], table=table).to(device)
        outs = []
        for h in range(state.halves):
            part = slice(h * images, (h + 1) * images)
            q = call.query[part].transpose(0, 1).reshape(1, heads, images * n, d)
            k = call.key[part].transpose(0, 1).reshape(1, heads, images * n, -1)
            v = call.value[part].transpose(0, 1).reshape(1, heads, images * n, call.value.shape[-1])
            out = kernels.attention(q, k, v, scale=attn.scale, mask=routing)
            outs.append(out.reshape(heads, images, n, -1).transpose(0, 1))
        return output(attn, torch.cat(outs), call)


# ------------------------------------------------------------------------------------------------
# ConsiStory preset: subject-driven shared attention
# ------------------------------------------------------------------------------------------------


@dataclass
class SubjectSharedState:
    """Per-generation state of :class:`SubjectSharedProcessor` (ConsiStory's SDSA), shared by every
    layer.

    Attributes:
        settings: the :class:`attnctrl.consistency.ConsiStory` options.
        positions: per prompt, the token positions of its subject words in the padded text sequence.
        images_per_prompt: images per prompt. One CFG half holds ``len(positions) *
            images_per_prompt`` images, each prompt's images next to each other (diffusers' layout).
        halves: 2 with classifier-free guidance (rows ``[unconditional..., conditional...]``), else 1.
        latent_hw: the latent grid of the current generation; mask_grid: the cross-attention level
            (h, w) the masks are made from. Both are set by the pipeline's hook.
        step, steps: the current step (0-based) and the number of steps (set by the hook).
        stock_rows: on a query-blending step the UNet call is doubled (set by the pipeline's hook
            for each call): its first ``stock_rows`` rows are a stock copy of the real rows that
            follow, run with plain attention so that the shared layers can keep their queries. 0
            when the call is not doubled.
        generator: the private dropout generator, reseeded by :meth:`restart`.
        history: the anchors' subject-token maps of the last ``mask_steps`` finished steps, each
            (anchors, h, w, C) float32, C = len(:attr:`columns`), averaged over the layers.
        queries: the vanilla queries of the current step (from the stock rows), layer name ->
            (batch, heads, N, d).
    """

    settings: ConsiStory
    positions: tuple[tuple[int, ...], ...]
    images_per_prompt: int = 1
    halves: int = 2
    latent_hw: tuple[int, int] | None = None
    mask_grid: tuple[int, int] | None = None
    step: int = 0
    steps: int = 1
    stock_rows: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator(device="cpu"))
    history: deque = field(default_factory=deque)
    queries: dict[str, torch.Tensor] = field(default_factory=dict)
    _sum: torch.Tensor | None = None
    _count: int = 0
    _cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.positions = tuple(tuple(int(p) for p in ps) for ps in self.positions)
        self.history = deque(self.history, maxlen=int(self.settings.mask_steps))
        self.generator.manual_seed(int(self.settings.seed))

    @property
    def images(self) -> int:
        """Images per CFG half."""
        return len(self.positions) * self.images_per_prompt

    @property
    def anchors(self) -> int:
        return min(int(self.settings.anchors), self.images)

    @property
    def columns(self) -> list[int]:
        """The text positions recorded: every prompt's subject positions, sorted, once each."""
        return sorted({p for ps in self.positions for p in ps})

    # -- lifecycle ------------------------------------------------------------------------------
    def restart(self) -> None:
        """A new generation: reseed the generator (same seed, same dropout) and forget the maps."""
        self.generator.manual_seed(int(self.settings.seed))
        self.history.clear()
        self._sum, self._count = None, 0
        self._cache.clear()
        self.queries.clear()
        self.step = 0

    def begin_step(self, step: int, steps: int) -> None:
        """Enter step ``step`` of ``steps``: the maps of the step that ended join the history and
        the per-step draws and vanilla queries are dropped."""
        if step != self.step:
            if self._count:
                self.history.append(self._sum / self._count)
            self._sum, self._count = None, 0
            self._cache.clear()
            self.queries.clear()
        self.step, self.steps = step, steps

    def check_batch(self, rows: int) -> int:
        """Images per CFG half of a call with ``rows`` rows; raises if it is not the batch this
        state was set up for (the subject positions would belong to other prompts)."""
        if rows % self.halves or rows // self.halves != self.images:
            halves = " in two CFG halves" if self.halves == 2 else ""
            raise PromptMismatchError(
                f"subject-driven shared attention was set up for {self.images} images per CFG half "
                f"({len(self.positions)} prompts x {self.images_per_prompt}), but the UNet got a batch of {rows}{halves}; "
                "give the pipeline the same prompts, images_per_prompt=num_images_per_prompt, and cfg=False "
                "when guidance_scale <= 1"
            )
        return self.images

    # -- masks ----------------------------------------------------------------------------------
    def record(self, probs: torch.Tensor) -> None:
        """Add one layer's cross-attention at :attr:`mask_grid` to the current step.

        ``probs``: (rows, N, C) head-averaged probabilities of the :attr:`columns` for every row of
        the call; the anchors of the conditional half (the last half) are kept."""
        images = self.check_batch(probs.shape[0])
        first = (self.halves - 1) * images
        h, w = self.mask_grid
        maps = probs[first : first + self.anchors].detach().float().reshape(self.anchors, h, w, -1)
        self._sum = maps if self._sum is None else self._sum + maps
        self._count += 1

    def subject_maps(self) -> list[torch.Tensor] | None:
        """Per anchor, its subject tokens' maps (P, h, w), averaged over the history; None before
        the first step has ended."""
        if not self.history:
            return None
        mean = torch.stack(list(self.history)).mean(0)  # (anchors, h, w, C)
        index = {p: c for c, p in enumerate(self.columns)}
        out = []
        for i in range(self.anchors):
            own = [index[p] for p in self.positions[i // self.images_per_prompt]]
            out.append(mean[i][..., own].permute(2, 0, 1))
        return out

    def masks(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(anchors, h * w) bool subject masks at ``grid`` for this step (cached); all False before
        any map was recorded."""
        key = ("masks", grid, str(device))
        if key not in self._cache:
            maps = self.subject_maps()
            if maps is None:
                masks = torch.zeros(self.anchors, grid[0] * grid[1], dtype=torch.bool, device=device)
            else:
                # Otsu's histogram runs on the CPU; the maps are small (P x h x w per anchor)
                masks = torch.stack([subject_mask(m.cpu(), grid).flatten() for m in maps]).to(device)
            self._cache[key] = masks
        return self._cache[key]

    def routing(self, grid: tuple[int, int], device: torch.device) -> Routing | None:
        """This step's SDSA routing over one CFG half at ``grid`` (the key dropout is drawn once per
        step and grid), or None when nothing is shared (one image, empty or fully dropped masks)."""
        key = ("routing", grid, str(device))
        if key not in self._cache:
            masks = self.masks(grid, device)
            routing = None
            if self.images > 1 and bool(masks.any()):
                kept = key_dropout(masks, float(self.settings.dropout), self.generator)
                if bool(kept.any()):
                    tokens = grid[0] * grid[1]
                    query, key_labels, table = subject_routing_labels(self.images, tokens, masks, kept)
                    routing = Routing(query_groups=query.reshape(1, -1), key_groups=key_labels[None], table=table).to(device)
            self._cache[key] = routing
        return self._cache[key]


class SubjectSharedProcessor:
    """ConsiStory's subject-driven shared attention on one layer (see
    :class:`attnctrl.consistency.ConsiStory`).

    Self-attention of a shared layer (``share=True``): each image of a CFG half attends to its own
    tokens plus the anchors' kept subject tokens, as one :class:`~attnctrl.kernels.Routing` over the
    half's concatenated tokens; during query blending its queries are mixed with the stored vanilla
    ones. Cross-attention at the mask level: computed as usual while the subject columns'
    probabilities are recorded. Anything else: plain attention.

    On a doubled call (``state.stock_rows > 0``, query blending) the first ``stock_rows`` rows run
    plain attention and a shared layer stores their queries as the vanilla ones; the remaining (real)
    rows are then processed as above, blending with those queries. Only the real rows are recorded
    for the masks.

    Shapes: ``hidden_states`` (batch, N, C) or (batch, C, h, w), batch = ``halves x images`` (twice
    that on a doubled call).
    """

    def __init__(self, state: SubjectSharedState, name: str, share: bool = True) -> None:
        self.state = state
        self.name = name
        self.share = share

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        stock = self.state.stock_rows
        if stock:
            rows = hidden_states.shape[0]
            if rows != 2 * stock:
                raise RuntimeError(
                    f"subject-driven shared attention: a query-blending call should have {2 * stock} rows "
                    f"({stock} stock + {stock} real), this layer got {rows}"
                )

            def part(value: Any, rows: slice) -> Any:
                if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 2 * stock:
                    return value[rows]
                return value

            inputs = (hidden_states, encoder_hidden_states, attention_mask, temb)
            first = self._stock(attn, project(attn, *(part(v, slice(None, stock)) for v in inputs)))
            second = self._real(attn, project(attn, *(part(v, slice(stock, None)) for v in inputs)))
            return torch.cat([first, second])
        return self._real(attn, project(attn, hidden_states, encoder_hidden_states, attention_mask, temb))

    def _stock(self, attn: Any, call: Any) -> torch.Tensor:
        """The stock rows of query blending: plain attention, and a shared self-attention layer
        keeps their queries for the real rows."""
        state = self.state
        if self.share and not call.is_cross and call.mask is None:
            if state.settings.blend_weight(state.step, state.steps) is not None:
                state.queries[self.name] = call.query.detach()
        hidden = kernels.attention(call.query, call.key, call.value, scale=attn.scale, mask=call.mask)
        return output(attn, hidden, call)

    def _real(self, attn: Any, call: Any) -> torch.Tensor:
        if call.mask is None:
            if call.is_cross:
                if self._records(call):
                    return self._record(attn, call)
            elif self.share:
                return self._shared(attn, call)
        hidden = kernels.attention(call.query, call.key, call.value, scale=attn.scale, mask=call.mask)
        return output(attn, hidden, call)

    def _grid(self, call: Any) -> tuple[int, int] | None:
        latent = self.state.latent_hw
        return None if latent is None else resolution_of(call.query.shape[2], latent)

    def _records(self, call: Any) -> bool:
        state = self.state
        return state.mask_grid is not None and self._grid(call) == state.mask_grid

    def _record(self, attn: Any, call: Any) -> torch.Tensor:
        state = self.state
        hidden, probs = kernels.attention_with_probs(call.query, call.key, call.value, columns=state.columns, scale=attn.scale)
        state.record(probs.mean(1))
        return output(attn, hidden, call)

    def _shared(self, attn: Any, call: Any) -> torch.Tensor:
        state = self.state
        rows, heads, n, d = call.query.shape
        weight = state.settings.blend_weight(state.step, state.steps)
        query = call.query
        vanilla = state.queries.get(self.name)
        if weight is not None and vanilla is not None and vanilla.shape == query.shape:
            query = weight * vanilla + (1 - weight) * query
        grid = self._grid(call)
        routing = None
        if grid is not None and state.settings.shares(state.step):
            state.check_batch(rows)
            routing = state.routing(grid, query.device)
        if routing is None:
            hidden = kernels.attention(query, call.key, call.value, scale=attn.scale)
            return output(attn, hidden, call)
        images = state.images
        outs = []
        for h in range(state.halves):
            # one half's images as one sequence: the routing decides who sees whom, and the halves
            # are separate calls, so unconditional and conditional tokens never meet
            part = slice(h * images, (h + 1) * images)
            q = query[part].transpose(0, 1).reshape(1, heads, images * n, d)
            k = call.key[part].transpose(0, 1).reshape(1, heads, images * n, -1)
            v = call.value[part].transpose(0, 1).reshape(1, heads, images * n, call.value.shape[-1])
            out = kernels.attention(q, k, v, scale=attn.scale, mask=routing)
            outs.append(out.reshape(heads, images, n, -1).transpose(0, 1))
        return output(attn, torch.cat(outs), call)
