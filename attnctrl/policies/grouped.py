"""GRAT grouped block-sparse attention (``research/efficient-attention-anchors.md`` §5), registered
as policy ``"grouped"``: tokens in g×g groups, each query group attends to the groups in a
Chebyshev neighbourhood (GRAT-B) or in its group row and column (GRAT-X), run as a
:class:`~attnctrl.kernels.Routing` over group-major tokens, gathered into dense batches, or (CPU)
as strided strips combined by their log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import InvalidOptionError, InvalidWeightError
from ..kernels.routing import Routing
from .base import PolicyCall, PolicyState, register_policy
from .common import check_gating, choice, int_pair, steps_active
from .window import PAD_REGION, padded_size, window_regions

__all__ = [
    "GroupedAttention",
    "GROUP_PATTERNS",
    "GROUPED_IMPLEMENTATIONS",
    "group_permutation",
    "to_group_major",
    "from_group_major",
    "group_neighbours",
    "group_slot_classes",
    "grouped_routing",
    "grouped_attention",
    "density",
    "grouped_density",
    "grouped_is_dense",
    "grouped_implementation",
    "strips_refusal",
]


GROUP_PATTERNS = ("neighborhood", "criss-cross")
#: How :func:`grouped_attention` computes (see :class:`GroupedAttention`).
GROUPED_IMPLEMENTATIONS = ("auto", "routing", "gather", "strips")


@dataclass(frozen=True)
class GroupedAttention:
    """GRAT grouped block-sparse self-attention, frozen and validated.

    Tokens are cut into ``group×group`` groups; all queries of a group attend to the same key
    groups: those within Chebyshev distance ``radius`` of their group (``"neighborhood"``,
    GRAT-B; radius 1 = the 3×3 groups around it) or those sharing its group row or group column
    (``"criss-cross"``, GRAT-X). Training-free, like GRAT.

    Default ``group=16``: 256 tokens per group, the token count of GRAT's released (4, 8, 8)
    video groups, and exactly two 128-token tiles in group-major order, so the block-sparse
    kernels (FlexAttention's BlockMask, the triton backend) see only full or empty tiles. It gives
    about 12% density at 128×128 tokens (N = 16384) with the 3×3 neighbourhood; use
    :func:`density` to choose another setting. Grids smaller than ~3 groups per side are
    (nearly) full attention: lower ``group`` there (e.g. 8 for 64×64 tokens, density 12%).

    Args:
        group: tokens per group side (int) or ``(rows, cols)``; edge groups are partial.
        pattern: ``"neighborhood"`` (GRAT-B) or ``"criss-cross"`` (GRAT-X).
        radius: Chebyshev radius of the neighbourhood, in groups (``"neighborhood"`` only).
        implementation: ``"routing"`` (a :class:`~attnctrl.kernels.Routing` over group-major
            tokens, run by the kernel backend: block-sparse on flex/triton), ``"gather"``
            (gather each group's allowed key groups into a dense buffer; runs on any backend and
            device at ``S``× the K/V memory, ``S`` = key groups per query group), ``"strips"``
            (CPU, neighbourhood, whole groups: each row of query groups attends to its key group
            rows as overlapping strided views of the group-major K/V, no copy, on PyTorch's CPU
            flash kernel, and the partial results are combined by their log-sum-exp) or
            ``"auto"`` (strips on CPU where they apply, else gather; routing elsewhere).
        steps, max_downsample, layers, backend: as in :class:`WindowAttention` (default: every
            step; the highest-resolution attention level of a UNet, every block of a DiT).
    """

    group: Any = 16
    pattern: str = "neighborhood"
    radius: int = 1
    implementation: str = "auto"
    steps: Any = (0.0, 1.0)
    max_downsample: int | None = None
    layers: Any = None
    backend: str | None = None

    def __post_init__(self) -> None:
        owner = "GroupedAttention"
        object.__setattr__(self, "group", int_pair("group", self.group, owner=owner, example="16 or (16, 16)"))
        choice("pattern", self.pattern, GROUP_PATTERNS, owner=owner)
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or self.radius < 0:
            raise InvalidWeightError(
                f"{owner}: radius must be an int >= 0 (groups around the query's group; 1 = 3x3), got {self.radius!r}"
            )
        choice("implementation", self.implementation, GROUPED_IMPLEMENTATIONS, owner=owner)
        check_gating(self, owner, default_steps="(0.0, 1.0)")

    def step_active(self, step: int, num_steps: int) -> bool:
        """Whether step ``step`` (0-based) of ``num_steps`` uses grouped attention."""
        return steps_active(self.steps, step, num_steps)


def _group_grid(h: int, w: int, group: tuple[int, int]) -> tuple[int, int]:
    return (-(-h // group[0]), -(-w // group[1]))


def group_permutation(
    h: int, w: int, group: tuple[int, int], *, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major <-> group-major token order.

    Group-major order lists the groups row-major over the group grid, and each group's tokens
    row-major inside it, so every group is contiguous (partial edge groups are shorter).

    Returns:
        ``(perm, inverse)``, both ``(N,)`` int64: ``x_group_major = x[..., perm, :]`` and
        ``x = x_group_major[..., inverse, :]``.
    """
    gx = _group_grid(h, w, group)[1]
    rows = torch.arange(h, device=device)[:, None] // group[0]
    cols = torch.arange(w, device=device)[None, :] // group[1]
    group_of_token = (rows * gx + cols).flatten()
    perm = torch.argsort(group_of_token, stable=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=device)
    return perm, inverse


def to_group_major(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D)`` row-major -> group-major (``perm`` from :func:`group_permutation`)."""
    return x.index_select(2, perm)


def from_group_major(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D)`` group-major -> row-major (``inverse`` from :func:`group_permutation`)."""
    return x.index_select(2, inverse)


def _group_allow(gy: int, gx: int, pattern: str, radius: int, device: Any = None) -> torch.Tensor:
    """``(G, G)`` bool: query group (row) may attend to key group (column); ``G = gy·gx``."""
    rows = torch.arange(gy * gx, device=device) // gx
    cols = torch.arange(gy * gx, device=device) % gx
    dr = (rows[:, None] - rows[None, :]).abs()
    dc = (cols[:, None] - cols[None, :]).abs()
    if pattern == "neighborhood":
        return torch.maximum(dr, dc) <= radius
    if pattern == "criss-cross":
        return (dr == 0) | (dc == 0)
    raise InvalidOptionError(f"pattern must be one of {GROUP_PATTERNS}, got {pattern!r}")


def group_neighbours(
    h: int, w: int, group: tuple[int, int], pattern: str = "neighborhood", radius: int = 1, *, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key groups of every query group, as fixed-width slots (for gather-then-dense).

    Neighbourhood: ``S = (2r+1)²`` slots in row-major offset order; slots past the border are
    invalid. Criss-cross: ``S = gx + gy - 1`` slots (the group row, then the rest of the group
    column), all valid. Groups are numbered row-major over the group grid.

    Returns:
        ``(index (G, S) int64, valid (G, S) bool)``; invalid slots point at the query group itself.
    """
    gy, gx = _group_grid(h, w, group)
    own = torch.arange(gy * gx, device=device)
    rows, cols = own // gx, own % gx
    if pattern == "neighborhood":
        offsets = torch.arange(-radius, radius + 1, device=device)
        dr = offsets.repeat_interleave(offsets.numel())
        dc = offsets.repeat(offsets.numel())
        r, c = rows[:, None] + dr[None, :], cols[:, None] + dc[None, :]
        valid = (r >= 0) & (r < gy) & (c >= 0) & (c < gx)
        index = torch.where(valid, r * gx + c, own[:, None])
        return index, valid
    if pattern == "criss-cross":
        same_row = rows[:, None] * gx + torch.arange(gx, device=device)[None, :]  # (G, gx)
        others = torch.arange(gy - 1, device=device)[None, :]
        other_rows = others + (others >= rows[:, None]).long()  # every row but the group's own
        same_col = other_rows * gx + cols[:, None]  # (G, gy - 1)
        index = torch.cat([same_row, same_col], dim=1)
        return index, torch.ones_like(index, dtype=torch.bool)
    raise InvalidOptionError(f"pattern must be one of {GROUP_PATTERNS}, got {pattern!r}")


def grouped_routing(
    h: int, w: int, group: tuple[int, int], pattern: str = "neighborhood", radius: int = 1, *, device: Any = None,
    context_tokens: int = 0,
) -> Routing:
    """The :class:`~attnctrl.kernels.Routing` of grouped attention over GROUP-MAJOR tokens.

    Labels ``(1, N)`` are the group ids (row-major over the group grid) of the tokens in
    :func:`group_permutation` order, so each group is a contiguous run; the ``(G, G)`` table is
    0 where the query group may attend to the key group and ``-inf`` elsewhere. Every group sees
    itself, so no query is fully masked.

    ``context_tokens`` ``L > 0``: the keys are the ``N`` group-major tokens followed by ``L`` context
    (MM-DiT text) keys with label ``G``, open to every query group: key labels ``(1, N + L)``,
    table ``(G, G + 1)``.
    """
    gy, gx = _group_grid(h, w, group)
    perm, _ = group_permutation(h, w, group, device=device)
    rows = torch.arange(h, device=device)[:, None] // group[0]
    cols = torch.arange(w, device=device)[None, :] // group[1]
    labels = (rows * gx + cols).flatten()[perm][None]
    allow = _group_allow(gy, gx, pattern, radius, device)
    table = torch.zeros(allow.shape, device=device).masked_fill(~allow, float("-inf"))
    keys = labels
    if context_tokens:
        keys = torch.cat([labels, torch.full((1, context_tokens), gy * gx, dtype=labels.dtype, device=device)], dim=1)
        table = torch.cat([table, torch.zeros(gy * gx, 1, device=device)], dim=1)
    return Routing(labels, keys, table, validate=False)  # labels in range by construction


def density(h: int, w: int, group: Any = 16, pattern: str = "neighborhood", radius: int = 1) -> float:
    """Fraction of the ``N²`` (query, key) pairs grouped attention computes on an ``h×w`` grid.

    Exact, partial edge groups included: ``Σ_{allowed (g, g')} |g|·|g'| / N²``.
    Example: ``density(128, 128, 16)`` is 0.118 (3×3 neighbourhood of 16×16 groups).
    """
    group = int_pair("group", group, owner="density", example="16 or (16, 16)")
    gy, gx = _group_grid(h, w, group)
    row_sizes = torch.tensor([min(group[0], h - i * group[0]) for i in range(gy)], dtype=torch.float64)
    col_sizes = torch.tensor([min(group[1], w - j * group[1]) for j in range(gx)], dtype=torch.float64)
    sizes = (row_sizes[:, None] * col_sizes[None, :]).flatten()  # (G,) tokens per group
    allowed = _group_allow(gy, gx, pattern, radius).double()
    return float(sizes @ allowed @ sizes) / float(h * w) ** 2


def grouped_is_dense(h: int, w: int, group: tuple[int, int], pattern: str = "neighborhood", radius: int = 1) -> bool:
    """Whether every query group may attend to every key group (grouped attention = full attention)."""
    gy, gx = _group_grid(h, w, group)
    if pattern == "criss-cross":
        return gy == 1 or gx == 1
    return radius >= max(gy, gx) - 1


def grouped_density(h: int, w: int, config: GroupedAttention) -> float:
    """:func:`density` of a :class:`GroupedAttention` config on an ``h×w`` token grid."""
    return density(h, w, config.group, config.pattern, config.radius)


def grouped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: int,
    w: int,
    *,
    group: tuple[int, int] = (16, 16),
    pattern: str = "neighborhood",
    radius: int = 1,
    implementation: str = "auto",
    scale: float | None = None,
    backend: Any = None,
    routing: Routing | None = None,
    permutation: tuple[torch.Tensor, torch.Tensor] | None = None,
    neighbours: tuple[torch.Tensor, torch.Tensor] | None = None,
    context: tuple[torch.Tensor, torch.Tensor] | None = None,
    slot_classes: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """GRAT grouped self-attention, one :func:`attnctrl.kernels.attention` call.

    ``"routing"``: permute q/k/v to group-major order, attend with :func:`grouped_routing` as the
    mask, permute back. ``"gather"``: cut q into padded groups ``(B·H, G, m, D)`` (``m = group
    rows·cols``; the groups on the kernel's head axis), gather each group's ``S`` allowed key groups
    into ``(B·H, G, S·m, D)`` and attend densely; groups with fewer valid neighbours (at the border)
    run as separate calls over their valid slots only, and padding inside partial groups is masked
    with a bool key mask. ``"strips"``: neighbourhood groups on CPU without copying K/V
    (:func:`_grouped_strips`). ``"auto"``: :func:`grouped_implementation`.

    Args:
        q, k, v: ``(B, H, N, D)``, ``(B, H, N, D)``, ``(B, H, N, Dv)``; ``N = h·w`` row-major.
        routing, permutation, neighbours: prebuilt :func:`grouped_routing`,
            :func:`group_permutation`, :func:`group_neighbours` for this grid (callers cache them;
            the routing built with the context's length).
        slot_classes: prebuilt :func:`group_slot_classes` on ``q``'s device (``"gather"``; without it
            they are derived from ``neighbours``, which reads their values back to the host).
        context: ``(key (B, H, L, D), value (B, H, L, Dv))`` every query also attends to in the same
            softmax (MM-DiT text tokens): appended to the routed keys with their own open label, to
            every gathered key buffer, or (strips) one more partial result combined by log-sum-exp.

    Returns:
        ``(B, H, N, Dv)`` in ``q.dtype``.
    """
    if implementation == "auto":
        implementation = grouped_implementation(q, k, v, h, w, group, pattern, backend)
    if implementation == "strips":
        reason = strips_refusal(q, k, v, h, w, group, pattern, backend)
        if reason is not None:
            raise InvalidOptionError(f"grouped_attention: implementation='strips' does not apply: {reason}; use 'gather'")
        return _grouped_strips(
            q, k, v, h, w, group, radius, q.shape[-1] ** -0.5 if scale is None else float(scale), backend, context
        )
    context_key, context_value = context if context is not None else (None, None)
    length = 0 if context_key is None else context_key.shape[2]
    if implementation == "routing":
        if routing is None:
            routing = grouped_routing(h, w, group, pattern, radius, device=q.device, context_tokens=length)
        perm, inverse = permutation or group_permutation(h, w, group, device=q.device)
        keys, values = to_group_major(k, perm), to_group_major(v, perm)
        if context_key is not None:
            keys, values = torch.cat([keys, context_key], dim=2), torch.cat([values, context_value], dim=2)
        out = kernels.attention(to_group_major(q, perm), keys, values, scale=scale, mask=routing, backend=backend)
        return from_group_major(out, inverse)
    if implementation != "gather":
        raise InvalidOptionError(f"implementation must be one of {GROUPED_IMPLEMENTATIONS}, got {implementation!r}")
    b, heads = q.shape[:2]
    index, valid = neighbours or group_neighbours(h, w, group, pattern, radius, device=q.device)
    n_groups = index.shape[0]
    m = group[0] * group[1]

    # Layout (B·H, G, tokens, D): attention is independent per (batch, head) pair, so the groups can
    # sit on the kernel's head axis. Gathering a group's neighbours is then one index_select whose
    # result is already contiguous in the layout the kernel wants (with the groups on the batch axis
    # it needs a transpose copy as well, of the 9x-sized buffer).
    def grouped(x: torch.Tensor) -> torch.Tensor:
        return _to_groups(x, h, w, group)  # (B, H, G, m, D)

    qg, kg, vg = grouped(q), grouped(k), grouped(v)
    real = None
    if h % group[0] or w % group[1]:
        real = window_regions(h, w, group, device=q.device) != PAD_REGION  # (G, m): False on padding
    out = q.new_empty(b, heads, n_groups, m, v.shape[-1])
    # Groups are split by their number of valid slots (for a 3x3 neighbourhood: corner, edge and
    # interior groups), each class one dense call over exactly its valid key groups, so no score is
    # computed for a neighbour past the border; only padding inside partial groups is masked.
    for members, slots_index in slot_classes if slot_classes is not None else _slot_classes(index, valid):
        n_members, n_slots = slots_index.shape

        def pick(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
            picked = x.index_select(2, slots_index.flatten()).view(b * heads, n_members, n_slots * m, x.shape[-1])
            if extra is None:
                return picked
            shared = extra.reshape(b * heads, 1, length, extra.shape[-1]).expand(b * heads, n_members, length, extra.shape[-1])
            return torch.cat([picked, shared], dim=2)

        queries = qg.index_select(2, members).view(b * heads, n_members, m, q.shape[-1])
        mask = None if real is None else real[slots_index].view(1, n_members, 1, n_slots * m)
        if mask is not None and length:
            mask = torch.cat([mask, mask.new_ones(1, n_members, 1, length)], dim=-1)
        part = kernels.attention(queries, pick(kg, context_key), pick(vg, context_value), scale=scale, mask=mask, backend=backend)
        out.index_copy_(2, members, part.view(b, heads, n_members, m, -1))
    return _from_groups(out, h, w, group)


def strips_refusal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, group: tuple[int, int], pattern: str, backend: Any
) -> str | None:
    """``None`` if the ``"strips"`` implementation runs this call, else why not."""
    if pattern != "neighborhood":
        return f"it computes the neighbourhood pattern, not {pattern!r}"
    if h % group[0] or w % group[1]:
        return f"a {h}x{w} grid does not split into whole {group[0]}x{group[1]} groups"
    if q.device.type != "cpu":
        return "it is the CPU path (overlapping strided views of K and V); other devices run the routing"
    chosen, reasons = kernels.lse_backend(q, k, v, backend=backend)
    if chosen is None:
        return "no backend returns the log-sum-exp here (" + "; ".join(f"{n}: {r}" for n, r in reasons.items()) + ")"
    return None


def grouped_implementation(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, group: tuple[int, int], pattern: str, backend: Any
) -> str:
    """What ``implementation="auto"`` runs: strips on CPU where they apply, else gather; routing
    (block-sparse kernels) on other devices."""
    if q.device.type != "cpu":
        return "routing"
    return "strips" if strips_refusal(q, k, v, h, w, group, pattern, backend) is None else "gather"


def _column_runs(n_cols: int, radius: int) -> list[tuple[int, int, int, int]]:
    """Runs of query-group columns whose key columns (the neighbourhood clipped at the border) have
    the same offset and width: ``[(first, end, offset, span)]``; key columns are ``j+offset ..
    j+offset+span-1`` for every query column ``j`` of the run."""
    runs: list[tuple[int, int, int, int]] = []
    for j in range(n_cols):
        lo, hi = max(0, j - radius), min(n_cols, j + radius + 1)
        if runs and runs[-1][1] == j and runs[-1][2:] == (lo - j, hi - lo):
            runs[-1] = (runs[-1][0], j + 1, lo - j, hi - lo)
        else:
            runs.append((j, j + 1, lo - j, hi - lo))
    return runs


def _grouped_strips(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, group: tuple[int, int], radius: int, scale: float,
    backend: Any = None, context: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Neighbourhood grouped attention without copying K/V per query group.

    In group-major order the key groups ``j+offset .. j+offset+span-1`` of one group row are one
    contiguous run of tokens, and moving to the next query column moves that run by one group:
    for a row of query groups the keys in one key row are an overlapping strided view
    ``(B·H, columns, span·m, D)`` of K (and V). Each key row is one CPU flash call that also
    returns the log-sum-exp, and the up to ``2r+1`` partial outputs are combined exactly by it.
    ``context`` keys (MM-DiT text, ``(B, H, L, D)``) are one more partial result of every query.
    """
    b, heads, _, d = q.shape
    gy, gx = h // group[0], w // group[1]
    m = group[0] * group[1]
    # contiguous: the strided strip views below assume this exact layout (with one group column, or
    # batch 1, _to_groups/reshape can return a view that keeps the input's head-interleaved strides)
    qg, kg, vg = (_to_groups(x, h, w, group).reshape(b * heads, gy, gx, m, d).contiguous() for x in (q, k, v))
    out = torch.empty_like(qg)
    accumulate = torch.promote_types(q.dtype, torch.float32)

    def strip(x: torch.Tensor, key_row: int, first: int, columns: int, span: int) -> torch.Tensor:
        start = x.storage_offset() + (key_row * gx + first) * m * d
        return x.as_strided((b * heads, columns, span * m, d), (x.stride(0), m * d, d, 1), start)

    shared = None
    if context is not None:
        shared = tuple(x.reshape(b * heads, 1, x.shape[2], x.shape[-1]).contiguous() for x in context)

    def context_part(queries: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if shared is None:
            return []
        columns = queries.shape[1]
        keys, values = (x.expand(b * heads, columns, x.shape[2], x.shape[-1]) for x in shared)
        return [kernels.attention_with_lse(queries, keys, values, scale=scale, backend=backend)]

    for row in range(gy):
        key_rows = range(max(0, row - radius), min(gy, row + radius + 1))
        for first, end, offset, span in _column_runs(gx, radius):
            queries = qg[:, row, first:end]
            parts = [
                kernels.attention_with_lse(
                    queries, strip(kg, r, first + offset, end - first, span), strip(vg, r, first + offset, end - first, span),
                    scale=scale, backend=backend,
                )
                for r in key_rows
            ] + context_part(queries)
            if len(parts) == 1:
                out[:, row, first:end] = parts[0][0]
                continue
            lse = torch.stack([part[1] for part in parts])
            total = torch.logsumexp(lse, dim=0)
            combined = None
            for (part, _), part_lse in zip(parts, lse):
                term = part.to(accumulate) * torch.exp(part_lse - total).unsqueeze(-1).to(accumulate)
                combined = term if combined is None else combined.add_(term)
            out[:, row, first:end] = combined
    return _from_groups(out.view(b, heads, gy * gx, m, d), h, w, group)


def group_slot_classes(
    h: int, w: int, group: tuple[int, int], pattern: str = "neighborhood", radius: int = 1, *, device: Any = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The gather path's query-group classes (by number of valid key slots), built on the host and moved to
    ``device`` once, so that calls on an accelerator never read them back: ``[(members, slots)]``."""
    classes = _slot_classes(*group_neighbours(h, w, group, pattern, radius, device="cpu"))
    return [(members.to(device), slots.to(device)) for members, slots in classes]


def _slot_classes(index: torch.Tensor, valid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Query groups split by how many valid key slots they have: ``[(members (G_c,), slots (G_c, S_c))]``
    with only the valid slots, in their original order."""
    counts = valid.sum(dim=1).cpu()
    classes = []
    for count in sorted(set(counts.tolist())):
        members = torch.nonzero(counts == count).flatten().to(index.device)
        picked = index[members][valid[members]].view(len(members), count)
        classes.append((members, picked))
    return classes


def _to_groups(x: torch.Tensor, h: int, w: int, group: tuple[int, int]) -> torch.Tensor:
    """``(B, H, h·w, D)`` row-major tokens -> ``(B, H, G, m, D)``: groups row-major over the group grid
    (zero-padded at the bottom/right to whole groups), tokens row-major inside each group."""
    b, heads, _, d = x.shape
    hp, wp = padded_size(h, w, group)
    grid = x.reshape(b, heads, h, w, d)
    if (hp, wp) != (h, w):
        grid = F.pad(grid, (0, 0, 0, wp - w, 0, hp - h))
    py, px = hp // group[0], wp // group[1]
    grid = grid.view(b, heads, py, group[0], px, group[1], d).permute(0, 1, 2, 4, 3, 5, 6)
    return grid.reshape(b, heads, py * px, group[0] * group[1], d)


def _from_groups(x: torch.Tensor, h: int, w: int, group: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`_to_groups`: ``(B, H, G, m, D)`` -> ``(B, H, h·w, D)`` (padding dropped)."""
    b, heads, _, _, d = x.shape
    hp, wp = padded_size(h, w, group)
    py, px = hp // group[0], wp // group[1]
    grid = x.view(b, heads, py, px, group[0], group[1], d).permute(0, 1, 2, 4, 3, 5, 6).reshape(b, heads, hp, wp, d)
    return grid[:, :, :h, :w].reshape(b, heads, h * w, d)

def attend(config: GroupedAttention, call: PolicyCall, state: PolicyState) -> torch.Tensor | None:
    """One layer call under GRAT. The routing, the group-major permutation and the gather table
    are built once per grid and device for the install and shared by its layers and steps;
    ``implementation="auto"`` picks per call (:func:`grouped_implementation`). A grid where every
    group sees every other is stock attention (None)."""
    h, w = call.grid
    if grouped_is_dense(h, w, config.group, config.pattern, config.radius):
        return None
    device = call.query.device
    implementation = config.implementation
    if implementation == "auto":
        implementation = grouped_implementation(call.query, call.key, call.value, h, w, config.group, config.pattern, config.backend)
    shape = (h, w, config.group, config.pattern, config.radius, device)
    length = call.context_tokens
    extra: dict[str, Any] = {}
    if call.context_key is not None:
        extra["context"] = (call.context_key, call.context_value)
    if implementation == "routing":
        extra["routing"] = state.cached(
            ("grouped-routing", *shape, length),
            lambda: grouped_routing(
                h, w, config.group, config.pattern, config.radius, device=device, context_tokens=length
            ),
        )
        extra["permutation"] = state.cached(
            ("group-permutation", h, w, config.group, device),
            lambda: group_permutation(h, w, config.group, device=device),
        )
    elif implementation == "gather":
        extra["neighbours"] = state.cached(
            ("group-neighbours", *shape),
            lambda: group_neighbours(h, w, config.group, config.pattern, config.radius, device=device),
        )
        extra["slot_classes"] = state.cached(
            ("group-slot-classes", *shape),
            lambda: group_slot_classes(h, w, config.group, config.pattern, config.radius, device=device),
        )
    return grouped_attention(
        call.query, call.key, call.value, h, w, group=config.group, pattern=config.pattern,
        radius=config.radius, implementation=implementation, scale=call.scale, backend=config.backend, **extra,
    )


register_policy("grouped", GroupedAttention, attend, models=("unet", "dit", "mmdit"))
