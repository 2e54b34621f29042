"""attnctrl.viz and attnctrl.io: heatmaps, overlays, grids, word-map figures, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from attnctrl import viz
from attnctrl.io import atomic_write_bytes, save_png_atomic, write_json_atomic


def test_colormap_is_dark_to_bright():
    lum = viz.COLORMAP.astype(float) @ np.array([0.2126, 0.7152, 0.0722])
    assert viz.COLORMAP.shape == (256, 3) and viz.COLORMAP.dtype == np.uint8
    assert np.all(np.diff(lum) >= -1.0)  # perceptual maps are monotone in lightness (up to rounding)
    assert lum[0] < 10 and lum[-1] > 200


def test_heatmap_size_and_normalisation():
    m = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    img = viz.heatmap(m)
    assert img.mode == "RGB" and img.size == (4, 3)
    arr = np.asarray(img)
    assert tuple(arr[0, 0]) == tuple(viz.COLORMAP[0])  # min -> first colour
    assert tuple(arr[-1, -1]) == tuple(viz.COLORMAP[-1])  # max -> last colour
    assert viz.heatmap(m, 32).size == (32, 32)
    assert viz.heatmap(m.numpy(), (40, 24)).size == (40, 24)
    # Constant and non-finite maps do not produce NaN colours.
    flat = np.asarray(viz.heatmap(np.ones((5, 5)), 10))
    assert np.all(flat == viz.COLORMAP[0])
    nan_map = np.array([[np.nan, 1.0], [0.0, np.inf]])
    assert viz.heatmap(nan_map, 8).size == (8, 8)
    with pytest.raises(ValueError):
        viz.heatmap(np.zeros((2, 3, 4)))


def test_overlay_keeps_image_size_any_aspect():
    image = Image.new("RGB", (96, 40), (0, 128, 255))
    out = viz.overlay(image, torch.rand(4, 10), alpha=0.5)
    assert out.size == (96, 40) and out.mode == "RGB"
    assert np.array_equal(np.asarray(viz.overlay(image, torch.rand(4, 10), alpha=0.0)), np.asarray(image))
    with pytest.raises(ValueError):
        viz.overlay(image, torch.rand(4, 4), alpha=1.5)


def test_image_grid_labels_and_sizes(tmp_path):
    images = [Image.new("RGB", (64, 32), c) for c in ("red", "green", "blue")]
    grid = viz.image_grid(images, 1, 3, ["source: a red circle", "edit 1", "edit 2 with a long label that wraps"],
                          path=tmp_path / "g.png")
    w, h = grid.size
    assert w > 3 * 64 and h > 32
    assert w > h  # one row of wide images stays wide
    assert Image.open(tmp_path / "g.png").size == grid.size
    with pytest.raises(ValueError):
        viz.image_grid(images, 1, 2)
    titled = viz.image_grid(images + images[:1], 2, 2, row_labels=["first row", "second row"])
    assert titled.size[1] > viz.image_grid(images + images[:1], 2, 2).size[1]
    with pytest.raises(ValueError):
        viz.image_grid(images, 2, 2, row_labels=["only one"])


class FakeStore:
    """Stands in for AttentionStore: word -> a map with a bright blob at a known place."""

    images_per_prompt = 1

    def __init__(self, prompts, hw=(8, 12)):
        self.prompts = prompts
        self.hw = hw

    def word_maps(self, i, word):
        if word not in self.prompts[i].split():
            raise ValueError(f"word {word!r} is not in the prompt")
        m = torch.zeros(self.hw)
        m[i % self.hw[0], len(word) % self.hw[1]] = 1.0
        return m


def test_word_map_figure_non_square(tmp_path):
    prompts = ["a cat on the grass", "a tiger on the grass"]
    images = [Image.new("RGB", (48, 32), "gray"), Image.new("RGB", (48, 32), "white")]
    store = FakeStore(prompts)
    path = tmp_path / "attention.png"
    fig = viz.word_map_figure(images, store, [["cat", "grass"], ["tiger"]], prompts=prompts, path=path)
    w, h = fig.size
    assert w > h  # 3 columns of wide cells, 2 rows
    assert Image.open(path).size == (w, h)
    # A flat word list is used for every prompt; words missing from a prompt get an empty cell.
    fig2 = viz.word_map_figure(images, store, ["cat", "tiger"], prompts=prompts)
    assert fig2.size[0] == w
    # Tall images work too.
    tall = [Image.new("RGB", (24, 72), "gray")] * 2
    fig3 = viz.word_map_figure(tall, FakeStore(prompts, (12, 4)), [["cat"], ["tiger"]], prompts=prompts)
    assert fig3.size[1] > fig3.size[0] * 0.9
    with pytest.raises(ValueError):
        viz.word_map_figure(images[:1], store, [["cat"]] * 2, prompts=prompts)


def test_atomic_writes(tmp_path):
    target = tmp_path / "sub" / "x.bin"
    atomic_write_bytes(target, b"abc")
    assert target.read_bytes() == b"abc"
    atomic_write_bytes(target, b"defg")
    assert target.read_bytes() == b"defg"
    write_json_atomic({"a": (1, 2), "b": float("nan"), "c": {"d": 1.5}}, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())  # strict JSON: NaN written as a string
    assert data == {"a": [1, 2], "b": "nan", "c": {"d": 1.5}}
    save_png_atomic(Image.new("RGB", (3, 2)), tmp_path / "i.png")
    assert Image.open(tmp_path / "i.png").size == (3, 2)
    assert sorted(os.listdir(tmp_path)) == ["i.png", "r.json", "sub"]  # no temp files left


def test_atomic_write_failure_leaves_old_file(tmp_path):
    target = tmp_path / "keep.json"
    target.write_text("old")

    class Boom:
        def save(self, f, format):
            f.write(b"partial")
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        save_png_atomic(Boom(), target)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["keep.json"]
