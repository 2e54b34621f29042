"""Consistency metrics: attention-level (any model, exact) and image-level on the shapes model.

Attention-level, from softmax probabilities ``P`` of shape (Nq, Nk) (or (H, Nq, Nk), averaged over H):

* :func:`leakage`: ``L[i, j] = mean over q in T_i of sum over k in K_j of P(q, k)``: how much of
  subject ``i``'s attention lands on subject ``j``. Isolation makes ``L[i, j]`` exactly 0 for
  ``i != j``.
* :func:`reference_share`: ``mean over q in T_i of sum over k in Ref_i of P(q, k)``.
* :func:`locality`: attention-weighted mean distance between query and key positions (grid units).

Image-level (:func:`subject_consistency`): on images of the shapes model, whether each subject's
colour and shape in its reference portrait reappear in every scene that names it, using
:func:`attnctrl.models.shapes.analyze` (no learned model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from .errors import InvalidOptionError

__all__ = ["leakage", "reference_share", "locality", "grid_positions", "subject_consistency", "SubjectConsistency"]


def _probs(probs: torch.Tensor) -> torch.Tensor:
    p = probs.detach().double()
    if p.ndim == 3:
        p = p.mean(0)
    if p.ndim != 2:
        raise InvalidOptionError(f"probabilities must be (Nq, Nk) or (H, Nq, Nk), got shape {tuple(probs.shape)}")
    return p


def leakage(probs: torch.Tensor, query_masks: torch.Tensor, key_masks: torch.Tensor) -> torch.Tensor:
    """(n, m) float64 leakage matrix from (Nq, Nk) probabilities, (n, Nq) and (m, Nk) bool masks.
    Rows of empty query masks are 0."""
    p = _probs(probs)
    q = query_masks.to(p.device).double()
    k = key_masks.to(p.device).double()
    mass = q @ p @ k.T  # (n, m): summed over the query tokens of i and key tokens of j
    return mass / q.sum(1, keepdim=True).clamp_min(1.0)


def reference_share(probs: torch.Tensor, query_masks: torch.Tensor, reference_key_masks: torch.Tensor) -> torch.Tensor:
    """(n,) float64: each subject's mean attention mass on its own reference's keys."""
    return torch.diagonal(leakage(probs, query_masks, reference_key_masks))


def grid_positions(h: int, w: int) -> torch.Tensor:
    """(h * w, 2) float64 (row, column) positions of a row-major token grid."""
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=1)


def locality(probs: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor, query_mask: torch.Tensor | None = None) -> float:
    """Attention-weighted mean distance ``sum_k P(q, k) |pos(q) - pos(k)|`` averaged over the
    queries (or over ``query_mask``'s queries)."""
    p = _probs(probs)
    distance = torch.cdist(query_positions.double().to(p.device), key_positions.double().to(p.device))
    per_query = (p * distance).sum(1)
    if query_mask is not None:
        per_query = per_query[query_mask.to(p.device).bool()]
    return float(per_query.mean()) if per_query.numel() else 0.0


@dataclass
class SubjectConsistency:
    """Per subject: the colour and shape found in its reference, and in how many of the scenes that
    name it the same colour+shape object (``carried``) or an object of the same colour
    (``colour_carried``) was found, as (hits, scenes). ``rate``/``colour_rate`` are the overall
    fractions. Shape detection on generated images is indicative only (see ``analyze``)."""

    reference: dict[str, tuple[str, str] | None]
    carried: dict[str, tuple[int, int]]
    colour_carried: dict[str, tuple[int, int]]

    @property
    def rate(self) -> float:
        hits = sum(h for h, _ in self.carried.values())
        total = sum(t for _, t in self.carried.values())
        return hits / total if total else 0.0

    @property
    def colour_rate(self) -> float:
        hits = sum(h for h, _ in self.colour_carried.values())
        total = sum(t for _, t in self.colour_carried.values())
        return hits / total if total else 0.0


def _array(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)


def subject_consistency(
    references: Sequence[Any], scenes: Sequence[Any], subject_names: Sequence[str], scene_subjects: Sequence[Sequence[str]]
) -> SubjectConsistency:
    """Whether each subject's (colour, shape) from its reference reappears in its scenes (shapes model).

    Args:
        references: one image per subject (PIL or (3, H, W) tensor in [0, 1]).
        scenes: scene images; ``scene_subjects[s]`` the names of the subjects scene ``s`` contains
            (``ConsistentSubjectsOutput.scene_subjects``).
    """
    from attnctrl.models.shapes import analyze

    found: dict[str, tuple[str, str] | None] = {}
    for name, image in zip(subject_names, references):
        objects = analyze(_array(image))
        found[name] = (objects[0].colour, objects[0].shape) if objects else None
    carried = {name: [0, 0] for name in subject_names}
    colour = {name: [0, 0] for name in subject_names}
    for image, names in zip(scenes, scene_subjects):
        objects = [(o.colour, o.shape) for o in analyze(_array(image))]
        for name in names:
            carried[name][1] += 1
            colour[name][1] += 1
            want = found.get(name)
            if want is not None and want in objects:
                carried[name][0] += 1
            if want is not None and any(c == want[0] for c, _ in objects):
                colour[name][0] += 1
    return SubjectConsistency(found, {k: (v[0], v[1]) for k, v in carried.items()}, {k: (v[0], v[1]) for k, v in colour.items()})
