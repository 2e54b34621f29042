"""Consistency routings on MM-DiT joint attention (SD3/SD3.5, Flux.1): the image tokens of the images of
one CFG half share or isolate by a :class:`~attnctrl.kernels.Routing` preset, while every row's text
stays its own. Tensors in, tensors out; nothing here knows about diffusers pipelines.

On a UNet the presets route self-attention (image tokens only). Joint attention also holds each row's
text tokens, so the preset's routing over the half's image tokens is extended:

* image queries of image ``i`` see the image keys the preset allows (their own image, the shared or
  kept tokens of the others, or, under isolation, everything but the other subjects) AND every text
  key of their own row, never another row's text, in ONE softmax;
* text queries of row ``i`` attend to their own row only (its image and text tokens), as stock.

Layout of one half's routed call (what :func:`joint_image_routing` labels): queries are the half's
images' image tokens one image after the other, ``(images·N)``; keys are the same image tokens followed
by the images' text tokens, ``(images·N + images·L)``.

Presets (the existing label builders of :mod:`attnctrl.consistency`):

* StoryDiffusion: :func:`~attnctrl.consistency.shared_routing_labels` (query label = image);
* ConsiStory: :func:`~attnctrl.consistency.subject_routing_labels` (query label = image);
* IR-Diffusion isolation: :func:`isolation_routing_labels` (per image, subject ``a`` never sees subject
  ``b`` of the same image; images never see each other).
"""

from __future__ import annotations

import torch

from . import kernels
from .consistency import group_labels, isolation_table
from .errors import InvalidOptionError
from .kernels.routing import Routing

__all__ = ["joint_image_routing", "joint_routed_attention", "isolation_routing_labels", "DENY"]

DENY = float("-inf")


def joint_image_routing(
    query_labels: torch.Tensor, key_labels: torch.Tensor, table: torch.Tensor, *, text_tokens: int
) -> Routing:
    """Extend an image-token routing preset of one CFG half to joint attention.

    Args:
        query_labels: ``(images, N)`` int labels in ``[0, Gq)`` of the half's image queries (image ``i``
            in row ``i``).
        key_labels: ``(images·N,)`` int labels in ``[0, Gk)`` of the half's image keys, image-major.
        table: ``(Gq, Gk)`` 0 = allow, -inf = deny (finite = bias) between them.
        text_tokens: ``L``, text tokens per row.

    Returns:
        The :class:`Routing` of queries ``(images·N)`` over keys ``(images·N + images·L)`` (image keys,
        then each image's text keys): query group ``i·Gq + g`` (image ``i``, preset group ``g``) sees the
        preset's image keys and the text of image ``i`` only. Built on the host from host labels
        (validated there), so move it once with ``.to(device)``.
    """
    images, tokens = query_labels.shape
    groups_q, groups_k = table.shape
    if key_labels.shape != (images * tokens,):
        raise InvalidOptionError(f"key_labels must be ({images * tokens},) for {images} images of {tokens} tokens, got {tuple(key_labels.shape)}")
    image_of_query = torch.arange(images, device=query_labels.device).repeat_interleave(tokens)
    query = image_of_query * groups_q + query_labels.reshape(-1).long()
    text = groups_k + torch.arange(images, device=key_labels.device).repeat_interleave(text_tokens)
    keys = torch.cat([key_labels.long(), text])
    own_text = torch.full((images, images), DENY, dtype=torch.float64).fill_diagonal_(0.0)
    extended = torch.cat([
        table.double().cpu().repeat(images, 1),  # (images·Gq, Gk): the preset, per image
        own_text.repeat_interleave(groups_q, dim=0),  # (images·Gq, images): own row's text only
    ], dim=1)
    return Routing(query[None], keys[None], extended.to(query_labels.device))


def isolation_routing_labels(
    masks: torch.Tensor, images: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IR-Diffusion isolation for ``images`` images that share the same subject masks.

    Args:
        masks: ``(subjects, N)`` bool, non-overlapping subject masks on the token grid.

    Returns:
        query labels ``(images, N)`` = ``i·(S+1) + g`` (``g`` 0 background, ``1..S`` subjects), key labels
        ``(images·N,)`` the same flattened, table ``(images·(S+1), images·(S+1))``: block-diagonal
        :func:`~attnctrl.consistency.isolation_table` (within an image, subject ``a`` never sees subject
        ``b``; images never see each other).
    """
    subjects = int(masks.shape[0])
    labels = group_labels(masks.bool().cpu())  # (N,) in [0, S]
    groups = subjects + 1
    per_image = torch.arange(images)[:, None] * groups + labels[None]
    table = torch.full((images * groups, images * groups), DENY, dtype=torch.float64)
    block = isolation_table(subjects).double().cpu()
    for i in range(images):
        table[i * groups : (i + 1) * groups, i * groups : (i + 1) * groups] = block
    return per_image, per_image.reshape(-1), table


def joint_routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: Routing,
    *,
    image: slice,
    text: slice,
    halves: int,
    backend: object = None,
) -> torch.Tensor:
    """Joint attention where the image tokens of each CFG half's images follow ``routing``.

    Args:
        q, k, v: ``(B, H, S, D)`` / ``(B, H, S, D)`` / ``(B, H, S, Dv)`` over each row's joint sequence;
            ``B = halves·images`` (CFG halves never mix).
        routing: :func:`joint_image_routing` of one half (on ``q``'s device).
        image, text: where the image and text tokens are in the joint sequence.

    Returns:
        ``(B, H, S, Dv)`` in ``q.dtype``: text rows are each row's plain joint attention; image rows
        one routed kernel call per half over the half's concatenated tokens.
    """
    rows, heads, _, dim = q.shape
    if rows % halves:
        raise InvalidOptionError(f"a batch of {rows} rows does not split into {halves} CFG halves")
    images = rows // halves
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    out[:, :, text] = kernels.attention(q[:, :, text], k, v, backend=backend)  # own row only, as stock

    def flat(x: torch.Tensor) -> torch.Tensor:  # (images, H, T, D) -> (1, H, images·T, D)
        return x.transpose(0, 1).reshape(1, heads, -1, x.shape[-1])

    for half in range(halves):
        part = slice(half * images, (half + 1) * images)
        keys = torch.cat([flat(k[part][:, :, image]), flat(k[part][:, :, text])], dim=2)
        values = torch.cat([flat(v[part][:, :, image]), flat(v[part][:, :, text])], dim=2)
        routed = kernels.attention(flat(q[part][:, :, image]), keys, values, mask=routing, backend=backend)
        out[part, :, image] = routed.reshape(heads, images, -1, v.shape[-1]).transpose(0, 1)
    return out
