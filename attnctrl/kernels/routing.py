"""Group routing: who may attend to whom, as labels plus a small table (never a dense mask).

A :class:`Routing` gives every query token and every key token a group label and says, per pair of
groups, whether the query group may attend to the key group and with which additive logit bias::

    scores[b, h, i, j] = q[b, h, i] . k[b, h, j] * scale + table[b, query_groups[b, i], key_groups[b, j]]

with ``table`` entries ``0`` (allow), ``-inf`` (deny) or any finite value (allow with that bias).
The same routing applies to every head. This one object expresses isolation (subject i may not
see subject j), reference sharing (target subject i may see reference i's subject tokens, with a
bias), query/key dropout (relabel some tokens to a group whose row/column denies), windows of
whole groups and FreeCustom-style biases; see ``research/consistency-anchors.md`` §7.

Backends execute it their own way (``attnctrl.kernels``): ``sdpa`` materialises the additive mask
one query chunk at a time, ``flex`` turns it into a FlexAttention ``BlockMask`` + ``score_mod``,
``reference`` materialises :meth:`Routing.dense`. Callers never build the ``(B, Nq, Nk)`` mask.

Batch broadcasting: ``query_groups``, ``key_groups`` and a 3-D ``table`` each have a leading batch
dimension that is either the batch size ``B`` of the attention call or ``1`` (shared by every
row, e.g. both CFG halves). :attr:`Routing.batch_size` is the largest of them.

Fully-masked queries (every key they could see is denied) give zero output and zero
probabilities in every backend, never NaN: see :meth:`Routing.dead_queries`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import torch

from ..errors import AttentionShapeError, InvalidOptionError, InvalidTypeError

__all__ = ["Routing"]

MASK_ROUTING = "routing"

_DENY = float("-inf")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _as_labels(name: str, labels: object) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise InvalidTypeError(f"Routing.{name} must be a torch.Tensor of integer group labels, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InvalidTypeError(
            f"Routing.{name} must hold integer group labels (int64), got dtype {labels.dtype}; "
            f"convert with .long() (for a bool mask: mask.long() gives groups 0/1)"
        )
    if labels.ndim != 2:
        raise AttentionShapeError(
            f"Routing.{name} must be 2-D (batch, tokens) with batch = the attention batch or 1, got shape "
            f"{_shape(labels)}; add the batch dim with labels[None]"
        )
    return labels.long()


@dataclasses.dataclass(frozen=True, eq=False)
class Routing:
    """Group routing of one attention call: query/key group labels and a group-by-group table.

    Attributes:
        query_groups: ``(Bq, Nq)`` integer labels in ``[0, Gq)`` (stored as int64); ``Bq`` is the
            attention batch ``B`` or 1.
        key_groups: ``(Bk, Nk)`` integer labels in ``[0, Gk)`` (stored as int64), ``Bk`` in ``{B, 1}``.
        table: ``(Gq, Gk)`` or ``(Bt, Gq, Gk)`` floating (stored as float32): ``0`` = allow,
            ``-inf`` = deny, a finite value = allow and add it to the scaled score. NaN and
            ``+inf`` are refused.

    All three tensors must be on one device (the device of the attention inputs at call time;
    :meth:`to` moves them). Construction checks shapes, dtypes and devices, and, with
    ``validate=True`` (the default), the values: label ranges and no NaN/``+inf`` in the table.
    Reading values is a host sync on an accelerator, so code that builds routings in the attention
    path from labels that are in range by construction passes ``validate=False``; on the ``meta``
    device values cannot be read and are never checked. The tensors are not copied when they already
    have the stored dtype: do not modify them in place afterwards, as that would bypass these
    checks (backend caches key on the tensors' identity and version counters, so they notice).

    ``mask_kind == "routing"``: pass a Routing as ``mask=`` to :func:`attnctrl.kernels.attention`.
    Equality is identity (two routings with equal contents are distinct objects).

    Example (two subjects isolated from each other, background shared)::

        labels = torch.tensor([[0, 1, 1, 2, 2, 0]])          # (1, N): background, subject 1, 2
        table = torch.zeros(3, 3)
        table[1, 2] = table[2, 1] = float("-inf")
        out = attention(q, k, v, mask=Routing(labels, labels, table))
    """

    query_groups: torch.Tensor
    key_groups: torch.Tensor
    table: torch.Tensor
    validate: dataclasses.InitVar[bool] = True

    mask_kind: ClassVar[str] = MASK_ROUTING

    def __post_init__(self, validate: bool = True) -> None:
        query_groups = _as_labels("query_groups", self.query_groups)
        key_groups = _as_labels("key_groups", self.key_groups)
        table = self.table
        if not isinstance(table, torch.Tensor):
            raise InvalidTypeError(f"Routing.table must be a torch.Tensor, got {type(table).__name__}")
        if not table.is_floating_point():
            raise InvalidTypeError(
                f"Routing.table must be floating point (0 = allow, -inf = deny, finite = bias), got dtype "
                f"{table.dtype}; for a bool allow-table use torch.zeros(...).masked_fill(~allow, float('-inf'))"
            )
        if table.ndim not in (2, 3):
            raise AttentionShapeError(
                f"Routing.table must be (query groups, key groups) or (batch, query groups, key groups), "
                f"got shape {_shape(table)}"
            )
        table = table.float()
        if table.shape[-2] == 0 or table.shape[-1] == 0:
            raise AttentionShapeError(f"Routing.table needs at least one query group and one key group, got shape {_shape(table)}")
        devices = {query_groups.device, key_groups.device, table.device}
        if len(devices) != 1:
            raise InvalidOptionError(
                f"Routing tensors must be on one device, got query_groups on {query_groups.device}, key_groups "
                f"on {key_groups.device}, table on {table.device}; move them with .to(device)"
            )
        check_values = validate and table.device.type != "meta"
        if check_values and (bool(torch.isnan(table).any()) or bool(torch.isposinf(table).any())):
            raise InvalidOptionError(
                "Routing.table contains NaN or +inf; use 0 to allow, -inf to deny, or a finite additive bias"
            )
        batches = {"query_groups": query_groups.shape[0], "key_groups": key_groups.shape[0]}
        if table.ndim == 3:
            batches["table"] = table.shape[0]
        sizes = {b for b in batches.values() if b != 1}
        if len(sizes) > 1:
            listed = ", ".join(f"{name} {b}" for name, b in batches.items())
            raise AttentionShapeError(
                f"Routing batch sizes disagree ({listed}); each must be the attention batch size or 1"
            )
        if 0 in batches.values():
            raise AttentionShapeError("Routing batch dims must be >= 1 (use batch 1 to share one routing across rows)")
        if key_groups.shape[1] == 0:
            raise AttentionShapeError("Routing.key_groups must label at least one key token")
        n_query_groups, n_key_groups = table.shape[-2], table.shape[-1]
        for name, labels, count, axis in (
            ("query_groups", query_groups, n_query_groups, "rows"),
            ("key_groups", key_groups, n_key_groups, "columns"),
        ):
            if labels.numel() == 0 or not check_values:
                continue
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= count:
                raise InvalidOptionError(
                    f"Routing.{name} labels must be in [0, {count}) (the table has {count} {axis}), got values in "
                    f"[{lo}, {hi}]; add {axis} to the table or relabel"
                )
        object.__setattr__(self, "query_groups", query_groups)
        object.__setattr__(self, "key_groups", key_groups)
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "_kept_keys", None)

    # -- sizes --------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Largest batch dim of the labels and table: the attention batch ``B``, or 1 if shared."""
        sizes = [self.query_groups.shape[0], self.key_groups.shape[0]]
        if self.table.ndim == 3:
            sizes.append(self.table.shape[0])
        return max(sizes)

    @property
    def num_queries(self) -> int:
        """``Nq``."""
        return int(self.query_groups.shape[1])

    @property
    def num_keys(self) -> int:
        """``Nk``."""
        return int(self.key_groups.shape[1])

    @property
    def num_query_groups(self) -> int:
        """``Gq``: rows of the table."""
        return int(self.table.shape[-2])

    @property
    def num_key_groups(self) -> int:
        """``Gk``: columns of the table."""
        return int(self.table.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def has_bias(self) -> bool:
        """Whether some table entry is a non-zero finite bias (else it is a pure allow/deny table)."""
        return bool(((self.table != 0) & torch.isfinite(self.table)).any())

    # -- construction helpers -------------------------------------------------------------------
    @classmethod
    def allow_all(cls, batch_size: int, num_queries: int, num_keys: int, *, device: torch.device | str | None = None) -> Routing:
        """Every query may attend to every key: one query group, one key group, table ``[[0]]``.

        Args:
            batch_size: ``B`` (or 1 to share across the batch); num_queries: ``Nq``; num_keys: ``Nk``.
        """
        return cls(
            torch.zeros(batch_size, num_queries, dtype=torch.long, device=device),
            torch.zeros(batch_size, num_keys, dtype=torch.long, device=device),
            torch.zeros(1, 1, device=device),
        )

    def with_query_dropout(self, relabel: Mapping[int, int], p: float, *, generator: torch.Generator) -> Routing:
        """A new Routing where each query of a group in ``relabel`` is moved, with probability
        ``p``, to the group ``relabel[group]``; key labels and table are shared, not copied.

        This is query-side dropout (IR-Diffusion's ``dropout=0.5`` on target tokens): give the
        "dropped" group a table row that denies the reference keys and allows the rest, e.g.
        ``routing.with_query_dropout({1: 3, 2: 4}, 0.5, generator=g)`` with rows 3 and 4 copies of
        rows 1 and 2 minus the reference columns.

        One uniform number is drawn per query label entry (``torch.rand(query_groups.shape)``,
        from ``generator`` on ``generator.device``, then moved to the labels' device), whatever
        the groups, so the draw sequence does not depend on group sizes and a seeded generator
        gives the same result on every device. The global RNG is never used. Queries whose
        ``query_groups`` batch dim is 1 share one draw across the batch; expand the labels to
        ``(B, Nq)`` first to draw per row.

        Args:
            relabel: source group -> destination group, both in ``[0, Gq)``.
            p: drop probability in ``[0, 1]``.
            generator: the ``torch.Generator`` to draw from (required: results must be reproducible).

        Returns:
            A new :class:`Routing` with new ``query_groups``.
        """
        if not isinstance(generator, torch.Generator):
            raise InvalidTypeError(
                f"with_query_dropout needs a torch.Generator (e.g. torch.Generator().manual_seed(seed)), "
                f"got {type(generator).__name__}; the global RNG is never used"
            )
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise InvalidOptionError(f"dropout probability p must be in [0, 1], got {p}")
        groups = self.num_query_groups
        pairs = [(int(src), int(dst)) for src, dst in dict(relabel).items()]
        for src, dst in pairs:
            if not (0 <= src < groups and 0 <= dst < groups):
                raise InvalidOptionError(
                    f"with_query_dropout: groups must be in [0, {groups}) (the table has {groups} rows), got "
                    f"{src} -> {dst}; add a table row for the dropped group first"
                )
        draw = torch.rand(self.query_groups.shape, generator=generator, device=generator.device)
        dropped = draw.to(self.query_groups.device) < p
        labels = self.query_groups
        new_labels = labels.clone()
        for src, dst in pairs:
            new_labels[(labels == src) & dropped] = dst
        return Routing(new_labels, self.key_groups, self.table, validate=False)  # relabelled within range

    def to(self, device: torch.device | str) -> Routing:
        """This routing with its tensors on ``device`` (``self`` when they already are)."""
        device = torch.device(device)
        if self.device == device or (device.index is None and self.device.type == device.type):
            return self
        return Routing(self.query_groups.to(device), self.key_groups.to(device), self.table.to(device), validate=False)

    # -- checks used by the kernel layer --------------------------------------------------------
    def check_compatible(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Raise if this routing does not fit ``q (B, H, Nq, D)`` and ``k (B, H, Nk, D)``.

        Called by :func:`attnctrl.kernels.attention` before backend selection.
        """
        b, nq, nk = q.shape[0], q.shape[2], k.shape[2]
        if self.num_queries != nq or self.num_keys != nk:
            raise AttentionShapeError(
                f"Routing labels {self.num_queries} queries x {self.num_keys} keys, but the call has Nq={nq}, "
                f"Nk={nk} (q {_shape(q)}, k {_shape(k)}); build the labels for these tokens"
            )
        if self.batch_size not in (1, b):
            raise AttentionShapeError(
                f"Routing batch size {self.batch_size} does not fit the attention batch {b}; use {b} or 1"
            )
        if self.device != q.device:
            raise InvalidOptionError(
                f"Routing is on {self.device} but q is on {q.device}; move it with routing.to(q.device)"
            )

    # -- derived tensors -------------------------------------------------------------------------
    def _table3(self) -> torch.Tensor:
        """``(Bt, Gq, Gk)`` view of the table (``Bt`` in ``{1, B}``)."""
        return self.table if self.table.ndim == 3 else self.table[None]

    def table_in(self, dtype: torch.dtype) -> torch.Tensor:
        """``(Bt, Gq, Gk)`` table in ``dtype``; finite entries are clamped to the dtype's range so a
        large finite bias stays finite (never turns into a deny) in float16/bfloat16."""
        table = self._table3()
        if dtype == table.dtype:
            return table
        info = torch.finfo(dtype)
        if info.max >= torch.finfo(table.dtype).max:  # widening: every value fits
            return table.to(dtype)
        clamped = table.clamp(min=info.min, max=info.max)
        return torch.where(torch.isneginf(table), table, clamped).to(dtype)

    def key_groups_present(self) -> torch.Tensor:
        """``(Bk, Gk)`` bool: which key groups label at least one key of each batch row."""
        present = torch.zeros(self.key_groups.shape[0], self.num_key_groups, dtype=torch.bool, device=self.device)
        return present.scatter_(1, self.key_groups, True)

    def dead_query_groups(self) -> torch.Tensor:
        """``(B', Gq)`` bool, ``B' = batch_size``: query groups whose table row denies every key
        group present among the keys of that batch row (their queries see no key at all)."""
        allowed = ~torch.isneginf(self._table3())  # (Bt, Gq, Gk)
        return ~(allowed & self.key_groups_present()[:, None, :]).any(dim=-1)

    def dead_queries(self) -> torch.Tensor:
        """``(B', Nq)`` bool, ``B' = batch_size``: queries that may attend to no key at all.

        Such rows give zero output and zero probabilities in every backend. Cost
        ``O(B' (Nq + Nk + Gq Gk))``; nothing of size ``Nq x Nk`` is built.
        """
        b = self.batch_size
        return self.dead_query_groups().expand(b, -1).gather(1, self.query_groups.expand(b, -1))

    def attended_keys(self) -> torch.Tensor:
        """``(Nk,)`` bool: keys that at least one query (of any batch row) may attend to.

        A key is never attended when the table denies its group to every query group present in
        its batch row; backends may drop such keys before running attention. Cost
        ``O(B' (Nq + Nk + Gq Gk))``.
        """
        present = torch.zeros(self.query_groups.shape[0], self.num_query_groups, dtype=torch.bool, device=self.device)
        present.scatter_(1, self.query_groups, True)  # (Bq, Gq)
        allowed = ~torch.isneginf(self._table3())  # (Bt, Gq, Gk)
        live = (present[:, :, None] & allowed).any(dim=1)  # (B', Gk)
        b = self.batch_size
        return live.expand(b, -1).gather(1, self.key_groups.expand(b, -1)).any(dim=0)

    def kept_keys(self) -> tuple[int, torch.Tensor]:
        """``(count, columns)``: how many keys :meth:`attended_keys` keeps and their indices
        ``(count,)`` int64. Read back once per routing (one host sync), then cached on it."""
        cached = self._kept_keys
        if cached is None:
            attended = self.attended_keys()
            columns = attended.nonzero().squeeze(1)
            cached = (int(columns.numel()), columns)
            object.__setattr__(self, "_kept_keys", cached)
        return cached

    def additive_rows(
        self,
        start: int,
        stop: int,
        dtype: torch.dtype = torch.float32,
        *,
        columns: torch.Tensor | None = None,
        open_dead_rows: bool = False,
    ) -> torch.Tensor:
        """The additive mask of queries ``start:stop``: ``(B', 1, stop - start, C)`` in ``dtype``.

        Entry ``[b, 0, i, j] = table[b, query_groups[b, start + i], key_groups[b, keys[j]]]`` (0,
        -inf or the bias), ``keys`` = all ``Nk`` keys (``C = Nk``) or ``columns``. Memory is
        ``B' (stop - start) C`` elements; the sdpa backend calls this per query chunk.

        Args:
            columns: ``None`` or a 1-D int64 tensor of key indices in ``[0, Nk)``.
            open_dead_rows: give dead queries (:meth:`dead_queries`) an all-zero row instead of an
                all ``-inf`` one, for kernels that return NaN on fully masked rows: they then run
                those rows as ordinary ones and the caller zeroes their output.
        """
        b = self.batch_size
        table = self.table_in(dtype).expand(b, -1, -1)  # (B', Gq, Gk)
        if open_dead_rows:
            table = table.masked_fill(self.dead_query_groups()[:, :, None], 0.0)
        rows = self.query_groups[:, start:stop].expand(b, -1)  # (B', n)
        key_groups = self.key_groups if columns is None else self.key_groups.index_select(1, columns)
        n, c = rows.shape[1], key_groups.shape[1]
        # First the table row of each query (B', n, Gk), then pick each key's column: the only
        # index tensor is an expanded view of the key labels, so no (n, Nk) int64 tensor exists.
        per_query = table.gather(1, rows[:, :, None].expand(b, n, self.num_key_groups))
        key_columns = key_groups.expand(b, -1)[:, None, :].expand(b, n, c)
        return per_query.gather(2, key_columns)[:, None]

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full additive mask ``(B', 1, Nq, Nk)`` in ``dtype`` (0 allow, -inf deny, bias).

        The brute-force reference: ``O(B' Nq Nk)`` memory, for tests and small sizes only.
        """
        return self.additive_rows(0, self.num_queries, dtype)

    def __repr__(self) -> str:
        return (
            f"Routing(batch={self.batch_size}, Nq={self.num_queries}, Nk={self.num_keys}, "
            f"groups={self.num_query_groups}x{self.num_key_groups}, device={self.device})"
        )
