"""The web UI without a browser: form parsing, error mapping, the model cache, the ``attnctrl app``
command, and the actions on a tiny random-weight pipeline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from attnctrl import LocalBlend, Refine, Replace, Reweight, cli
from attnctrl.cli import options as cli_options
from attnctrl.app import options
from attnctrl.app.models import LoadedModel, ModelCache, check_model
from attnctrl.app.options import OptionError, user_message
from attnctrl.errors import (
    ImageLoadError,
    InvalidScheduleError,
    InvalidWeightError,
    PromptMismatchError,
    UnsupportedModelError,
    WordNotFoundError,
)
from attnctrl.models import SHAPES

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "a photo of a cat on the grass"
EDITED = "a photo of a tiger on the grass"


# ------------------------------------------------------------------------------------------------
# Form parsing
# ------------------------------------------------------------------------------------------------


def test_parse_weights():
    assert options.parse_weights("") == {}
    assert options.parse_weights("red=2\n  blue = 0.5 \n\n") == {"red": 2.0, "blue": 0.5}
    assert options.parse_weights("smiling=0.5,3") == {"smiling": (0.5, 3.0)}
    assert options.parse_weights("on the left=2") == {"on the left": 2.0}
    # the grammar every entry point shares refuses what `attnctrl edit --weight` refuses
    for bad in ("red", "=2", "red=", "red=abc", "red=2\nred=3", "red=nan", "red=inf"):
        with pytest.raises(OptionError):
            options.parse_weights(bad)


def test_parse_blend_and_cross_words():
    assert options.parse_blend("", 2) is None
    assert options.parse_blend("circle", 2) == [["circle"], ["circle"]]
    assert options.parse_blend("cat, tiger\ngrass", 2) == [["cat", "grass"], ["tiger", "grass"]]
    with pytest.raises(OptionError, match="3 comma-separated words for 2 prompts"):
        options.parse_blend("a, b, c", 2)
    assert options.parse_cross_words("tiger=0.4\ncat=0.2,0.6") == {"tiger": 0.4, "cat": (0.2, 0.6)}
    for bad in ("tiger", "default=0.5", "tiger=0.1,0.2,0.3", "tiger=x"):
        with pytest.raises(OptionError):
            options.parse_cross_words(bad)


def test_parse_size_and_numbers():
    assert options.parse_size("") is None and options.parse_size(None) is None
    assert options.parse_size("512x768") == (512, 768)
    assert options.parse_size(" 64 ") == (64, 64)
    assert options.parse_size("64×64") == (64, 64)
    for bad in ("abc", "60x64", "0x64", "64x64x64", f"{options.MAX_SIDE + 8}x64"):
        with pytest.raises(OptionError):
            options.parse_size(bad)
    assert options.check_int(5.0, "Steps", 1, 10) == 5
    for bad in (None, 5.5, float("nan"), 0, 11, "x"):
        with pytest.raises(OptionError):
            options.check_int(bad, "Steps", 1, 10)
    assert options.check_number("7.5", "Guidance", 0, 50) == 7.5
    for bad in (float("nan"), float("inf"), -1, "x"):
        with pytest.raises(OptionError):
            options.check_number(bad, "Guidance", 0, 50)


def test_parse_subjects():
    assert options.parse_subjects("ball | a red circle | circle\n\n box|a blue square|square ") == [
        ("ball", "a red circle", "circle"), ("box", "a blue square", "square")]
    for bad in ("", "ball | a red circle", "ball | | circle", "a | b | c | d"):
        with pytest.raises(OptionError):
            options.parse_subjects(bad)
    with pytest.raises(OptionError, match="at most"):
        options.parse_subjects("\n".join(f"s{i} | p | w" for i in range(options.MAX_SUBJECTS + 1)))


def test_edit_form_builds_the_cli_edits():
    form = options.edit_form(SOURCE, EDITED + "\n\n", "replace", "", "", 0.8, "", 0.4)
    assert form.prompts == [SOURCE, EDITED]
    assert form.edit == Replace(cross_steps=0.8, self_steps=0.4)
    # the same as `attnctrl edit --blend cat,tiger --weight grass=2 --cross 0.6 --cross tiger=0.4 --self 0.3`
    form = options.edit_form(SOURCE, EDITED, "replace", "grass=2", "cat, tiger", 0.6, "tiger=0.4", 0.3)
    expected = cli_options.build_edit("replace", cross={"default": 0.6, "tiger": 0.4}, self_steps=0.3, weights={"grass": 2.0},
                              blend=[["cat"], ["tiger"]])
    assert form.edit == expected
    assert isinstance(form.edit, Reweight) and isinstance(form.edit.base, Replace)
    assert form.edit.base.blend == LocalBlend([["cat"], ["tiger"]])
    form = options.edit_form(SOURCE, "a big cat on the grass", "refine", "", "", 0.8, "", 0.4)
    assert isinstance(form.edit, Refine)
    # reweight: no edited prompt needed (the source is reweighted), but a weight is
    form = options.edit_form(SOURCE, "", "reweight", "cat=0.2,3", "", 0.8, "", 0.4)
    assert form.prompts == [SOURCE, SOURCE] and isinstance(form.edit, Reweight) and form.edit.base is None
    with pytest.raises(OptionError, match="at least one weight"):
        options.edit_form(SOURCE, EDITED, "reweight", "", "", 0.8, "", 0.4)
    with pytest.raises(OptionError, match="at least one edited prompt"):
        options.edit_form(SOURCE, " \n ", "replace", "", "", 0.8, "", 0.4)
    with pytest.raises(OptionError, match="Source prompt"):
        options.edit_form("  ", EDITED, "replace", "", "", 0.8, "", 0.4)
    with pytest.raises(OptionError, match="at most"):
        options.edit_form(SOURCE, "\n".join([EDITED] * (options.MAX_PROMPTS + 1)), "replace", "", "", 0.8, "", 0.4)
    with pytest.raises(OptionError, match="Mode"):
        options.edit_form(SOURCE, EDITED, "swap", "", "", 0.8, "", 0.4)
    # non-numbers are refused by the grammar, out-of-range numbers by the library, each with its message
    with pytest.raises(OptionError, match="Weights 'cat=nan'.*finite"):
        options.edit_form(SOURCE, EDITED, "replace", "cat=nan", "", 0.8, "", 0.4)
    with pytest.raises(InvalidWeightError, match="out of range"):
        options.edit_form(SOURCE, EDITED, "replace", "cat=1e30", "", 0.8, "", 0.4)
    with pytest.raises(InvalidScheduleError):
        options.edit_form(SOURCE, EDITED, "replace", "", "", 0.8, "tiger=1.5", 0.4)
    # the shared words' text encoding: default (None), source (True), own (False)
    assert options.edit_form(SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4).edit.shared_steps is None
    assert options.edit_form(SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4, "default", "0.9").edit.shared_steps == (0.0, 0.9)
    assert options.edit_form(SOURCE, EDITED, "replace", "", "", 0.6, "", 0.4, "default", "off").edit.shared_steps == (0.0, 0.6)
    with pytest.raises(OptionError, match="replace edits only"):
        options.edit_form(SOURCE, "a big cat on the grass", "refine", "", "", 0.8, "", 0.4, "default", "0.5")
    with_blend = options.edit_form(SOURCE, EDITED, "replace", "", "cat, tiger", 0.8, "", 0.4, "default", "", 0.6)
    assert with_blend.edit.blend.threshold == 0.6
    assert options.edit_form(SOURCE, EDITED, "replace", "", "cat, tiger", 0.8, "", 0.4).edit.blend.threshold == 0.3
    with pytest.raises(OptionError, match="needs blend words"):
        options.edit_form(SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4, "default", "", 0.6)
    with pytest.raises(OptionError, match="Blend threshold"):
        options.edit_form(SOURCE, EDITED, "replace", "", "cat, tiger", 0.8, "", 0.4, "default", "", 1.5)
    with pytest.raises(OptionError, match="Shared words"):
        options.edit_form(SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4, "default", "all")
    assert options.edit_form(SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4, "own").edit.source_context is False
    assert options.edit_form(SOURCE, "a big cat on the grass", "refine", "", "", 0.8, "", 0.4, "source").edit.source_context is True
    assert options.edit_form(SOURCE, EDITED, "replace", "grass=2", "", 0.8, "", 0.4, "own").edit.base.source_context is False
    with pytest.raises(OptionError, match="applies to replace and refine"):
        options.edit_form(SOURCE, "", "reweight", "cat=2", "", 0.8, "", 0.4, "source")
    with pytest.raises(OptionError, match="not one of"):
        options.edit_form(SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4, "mine")


# ------------------------------------------------------------------------------------------------
# Errors -> messages
# ------------------------------------------------------------------------------------------------


def _raise(exc_factory):
    try:
        exc_factory()
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("no exception")


def test_user_message_accepts_attnctrl_errors_only():
    assert user_message(OptionError("Size: bad")) == "Size: bad"
    assert user_message(WordNotFoundError("word 'x' is not in\n the prompt")) == "word 'x' is not in the prompt"
    assert user_message(cli_options.OptionError("--port 0: bad")) == "--port 0: bad"
    # a ValueError raised inside attnctrl's own code (here attnctrl.viz) is the library's message
    from attnctrl import viz

    exc = _raise(lambda: viz.overlay(Image.new("RGB", (4, 4)), [[0.0]], alpha=2.0))
    assert isinstance(exc, ValueError) and "alpha" in user_message(exc)
    # ... but one raised by a library underneath, or by a bug, is not shown as such
    assert user_message(_raise(lambda: int("x"))) is None
    assert user_message(_raise(lambda: {}["key"])) is None
    assert user_message(RuntimeError("CUDA out of memory")) is None


def test_guard_turns_errors_into_gradio_errors(caplog):
    gr = pytest.importorskip("gradio")
    from attnctrl.app.ui import as_gradio_error, guard

    @guard
    def bad_word():
        raise WordNotFoundError("word 'green' is not in the prompt 'a red circle'; its words are ['a', 'red', 'circle']")

    with pytest.raises(gr.Error) as info:
        bad_word()
    assert "is not in the prompt" in info.value.message

    @guard
    def bug():
        return {}["missing"]

    with caplog.at_level("ERROR", logger="attnctrl.app"):
        with pytest.raises(gr.Error) as info:
            bug()
    assert "KeyError" in info.value.message and "server's log" in info.value.message
    assert "Traceback" not in info.value.message and "missing" not in info.value.message
    assert any("unexpected error" in r.message for r in caplog.records)

    original = gr.Error("already a gradio error")
    assert as_gradio_error(original) is original

    @guard
    def fine(a, b=2):
        return a + b

    assert fine(1) == 3
    import inspect

    assert list(inspect.signature(fine).parameters) == ["a", "b"]  # Gradio reads the handler's signature


# ------------------------------------------------------------------------------------------------
# Model names and the cache
# ------------------------------------------------------------------------------------------------


def test_check_model(tmp_path):
    for name in (None, "", "  shapes ", "SHAPES"):
        assert check_model(name) == SHAPES
    assert check_model("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(OptionError, match="no model_index.json"):
        check_model(str(folder))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert check_model(str(folder)) == str(folder)
    for bad in (str(tmp_path / "missing"), "./missing", "../etc/passwd", "~/nothing-here", "a/b/c", "not a model",
                "org/", "/etc/passwd", "org/na\x00me"):
        with pytest.raises(OptionError):
            check_model(bad)


class _FakePipe:
    pass


def test_model_cache_loads_once_and_is_thread_safe():
    calls = []
    lock = threading.Lock()

    def loader(model, device, dtype):
        with lock:
            calls.append((model, device, dtype))
        time.sleep(0.2)
        return _FakePipe()

    cache = ModelCache(device="cpu", dtype="fp32", loader=loader)
    got: list[LoadedModel] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("shapes"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 8 and all(g is got[0] for g in got)
    assert got[0].model == SHAPES and got[0].device == "cpu" and str(got[0].dtype) == "torch.float32"
    assert cache.key("shapes") == (SHAPES, "cpu", "torch.float32")
    assert cache.get("") is got[0] and len(calls) == 1  # the same model by another name
    assert cache.cached() == ["shapes"]


def test_model_cache_evicts_and_reports_load_errors():
    import torch

    def loader(model, device, dtype):
        if model == "org/offline":
            raise OSError("We couldn't connect to the hub.\nCheck your connection.")
        if model == "org/other":
            raise UnsupportedModelError("org/other is a FluxPipeline model; attnctrl supports ...")
        return _FakePipe()

    cache = ModelCache(device="cpu", dtype=torch.float32, max_models=1, loader=loader)
    first = cache.get("shapes")
    second = cache.get("org/name")
    assert cache.cached() == ["org/name"]
    assert cache.get("shapes") is not first  # evicted, loaded again
    assert second.display_name == "org/name"
    with pytest.raises(OptionError) as info:
        cache.get("org/offline")
    assert str(info.value) == "cannot load model 'org/offline': We couldn't connect to the hub."
    with pytest.raises(OptionError):
        cache.get("org/offline")  # a failed load can be retried (no stale lock)
    with pytest.raises(UnsupportedModelError):
        cache.get("org/other")
    with pytest.raises(OptionError):
        ModelCache(max_models=0)
    with pytest.raises(OptionError, match="backend"):
        ModelCache(backend="no-such-backend")


def test_import_is_light():
    code = (
        "import sys, attnctrl.app, attnctrl.app.options, attnctrl.app.models; "
        "heavy = [m for m in ('gradio', 'diffusers') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT.parent))
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# The `attnctrl app` command
# ------------------------------------------------------------------------------------------------


def test_app_command_options(monkeypatch):
    pytest.importorskip("gradio")
    import attnctrl.app

    seen = {}
    monkeypatch.setattr(attnctrl.app, "launch", lambda model, **kwargs: seen.update(model=model, **kwargs))
    assert cli.main(["app"]) == 0
    assert seen["model"] is None and seen["host"] == "127.0.0.1" and seen["share"] is False and seen["port"] is None
    assert seen["concurrency"] == 1 and seen["max_file_size"] == "10mb" and seen["steps"] == cli_options.DEFAULT_STEPS
    assert cli.main(["app", "--port", "7899", "--share", "--host", "0.0.0.0", "--model", "org/name",
                     "--concurrency", "2", "--max-file-size", "5MB", "--steps", "20"]) == 0
    assert seen["model"] == "org/name" and seen["port"] == 7899 and seen["share"] is True and seen["host"] == "0.0.0.0"
    assert seen["concurrency"] == 2 and seen["max_file_size"] == "5mb" and seen["steps"] == 20
    assert cli.main(["app", "--max-file-size", "2048"]) == 0 and seen["max_file_size"] == 2048


@pytest.mark.parametrize("argv, message", [
    (["app", "--port", "0"], "--port 0"),
    (["app", "--max-file-size", "lots"], "--max-file-size 'lots'"),
    (["app", "--max-file-size", "1.5mb"], "--max-file-size '1.5mb'"),
    (["app", "--concurrency", "0"], "--concurrency must be at least 1"),
    (["app", "--steps", "500"], "at most 100 steps"),
    (["app", "--model", "/no/such/folder"], "no such folder"),
])
def test_app_command_errors(argv, message, capsys):
    pytest.importorskip("gradio")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_app_help_lists_the_options():
    res = subprocess.run([sys.executable, "-m", "attnctrl", "app", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for option in ("--host", "--port", "--share", "--model", "--concurrency", "--max-file-size"):
        assert option in res.stdout
    assert "127.0.0.1" in res.stdout


# ------------------------------------------------------------------------------------------------
# Actions on a tiny pipeline (what the buttons do)
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny(sd_pipe):
    import torch

    return LoadedModel(model="tiny", device="cpu", dtype=torch.float32, pipe=sd_pipe)


def test_edit_and_attention_maps(tiny):
    from attnctrl.app import actions

    form = options.edit_form(SOURCE, EDITED, "replace", "grass=2", "cat, tiger", 0.8, "", 0.4)
    result = actions.run_edit(tiny, form, seed=1, steps=2, guidance=7.5, size=(32, 32))
    assert len(result.images) == 2 and result.images[0].size == (32, 32)
    assert result.captions() == [f"source: {SOURCE}", f"edit 1: {EDITED}"]
    assert result.words == [["cat", "grass"], ["tiger", "grass"]]
    assert "Reweight" in result.summary and "2 steps" in result.summary
    assert actions.display(result.images[0]).size == (256, 256)
    figure = actions.attention_figure(result)
    assert figure.size[0] > 3 * 32
    assert actions.attention_figure(result, "tiger, grass").size[0] > 0  # a word of only some prompts
    with pytest.raises(WordNotFoundError, match="none of the prompts"):
        actions.attention_figure(result, "dog")
    with pytest.raises(OptionError):
        actions.attention_figure(None)
    # a word that is not in the prompt: the library's message, before any denoising
    bad = options.edit_form(SOURCE, EDITED, "replace", "dog=2", "", 0.8, "", 0.4)
    with pytest.raises(WordNotFoundError) as info:
        actions.run_edit(tiny, bad, seed=0, steps=2, guidance=7.5, size=(32, 32))
    assert "dog" in user_message(info.value)
    mismatch = options.edit_form(SOURCE, "a photo of a big tiger on the grass", "replace", "", "", 0.8, "", 0.4)
    with pytest.raises(PromptMismatchError) as info:
        actions.run_edit(tiny, mismatch, seed=0, steps=2, guidance=7.5, size=(32, 32))
    assert "Refine" in user_message(info.value)


def test_generate_maps(tiny):
    from attnctrl.app import actions

    result = actions.generate_maps(tiny, "a red cat on the grass", seed=0, steps=2, guidance=7.5, size=(32, 32))
    assert result.words == [["red", "cat", "grass"]]
    assert actions.attention_figure(result).size[0] > 0
    with pytest.raises(WordNotFoundError, match="its words are"):
        actions.attention_figure(result, "tiger")
    with pytest.raises(OptionError):
        actions.generate_maps(tiny, "  ", seed=0, steps=2, guidance=7.5, size=None)


def test_real_image_invert_once_edit_many(tiny, tmp_path):
    from attnctrl.app import actions

    path = tmp_path / "photo.png"
    Image.new("RGB", (40, 32), (200, 30, 30)).save(path)
    assert actions.preview_image(str(path)).size[0] > 0
    inversion = actions.run_invert(tiny, str(path), SOURCE, method="ddim", steps=2, guidance=7.5)
    assert inversion.num_inference_steps == 2 and "ddim inversion" in actions.inversion_summary(inversion, tiny)
    for edited in (EDITED, "a photo of a dog on the grass"):
        form = options.edit_form(inversion.prompts[0], edited, "replace", "", "", 0.8, "", 0.4)
        result = actions.run_edit_inversion(tiny, inversion, form)
        assert len(result.images) == 2 and result.captions()[0] == f"reconstruction: {SOURCE}"
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ImageLoadError) as info:
        actions.preview_image(str(bad))
    assert str(bad) not in str(info.value) and "uploaded file" in user_message(info.value)
    with pytest.raises(ImageLoadError):
        actions.run_invert(tiny, str(bad), SOURCE, method="ddim", steps=2, guidance=7.5)
    with pytest.raises(OptionError):
        actions.run_invert(tiny, None, SOURCE, method="ddim", steps=2, guidance=7.5)


def test_concurrent_requests_on_one_model(tiny):
    """Two requests at once on one model: the model lock serialises them, results are per request."""
    from attnctrl.app import actions

    forms = [options.edit_form(SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4),
             options.edit_form(SOURCE, "a photo of a dog on the grass", "replace", "", "", 0.8, "", 0.4)]
    alone = [actions.run_edit(tiny, f, seed=3, steps=2, guidance=7.5, size=(32, 32)) for f in forms]
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(
        k, actions.run_edit(tiny, forms[k], seed=3, steps=2, guidance=7.5, size=(32, 32)))) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    import numpy as np

    for k in range(2):
        for a, b in zip(alone[k].images, results[k].images):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_build_app_wires_the_tabs(sd_pipe):
    gr = pytest.importorskip("gradio")
    from attnctrl.app.ui import build_app

    cache = ModelCache(device="cpu", dtype="fp32", loader=lambda model, device, dtype: sd_pipe)
    demo = build_app(None, cache=cache, steps=2)
    assert isinstance(demo, gr.Blocks)
    config = demo.get_config_file()
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    for label in ("Model", "Source prompt", "Edited prompts (one per line)", "Mode", "Source and edits",
                  "Image (PNG, JPEG, WebP)", "Subjects (one per line: name | portrait prompt | word)"):
        assert label in labels
    tabs = {c.get("props", {}).get("label") for c in config["components"] if c.get("type") == "tabitem"}
    assert tabs == {"Edit", "Attention maps", "Real image", "Consistent subjects", "Speed"}
    fns = {fn.name: fn.fn for fn in demo.fns.values()}
    gallery, summary, state = fns["edit"]("shapes", SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4, "default", "", None, 0, 2, 7.5, "32x32")
    assert len(gallery) == 2 and gallery[1][1] == f"edit 1: {EDITED}" and state.prompts == [SOURCE, EDITED]
    with pytest.raises(gr.Error) as info:
        fns["edit"]("shapes", SOURCE, EDITED, "replace", "dog=2", "", 0.8, "", 0.4, "default", "", None, 0, 2, 7.5, "32x32")
    assert "'dog'" in info.value.message
    with pytest.raises(gr.Error, match="Size"):
        fns["edit"]("shapes", SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4, "default", "", None, 0, 2, 7.5, "33x33")
    with pytest.raises(gr.Error, match="no such folder"):
        fns["edit"]("/no/such/model", SOURCE, EDITED, "replace", "", "", 0.8, "", 0.4, "default", "", None, 0, 2, 7.5, "")
    figure, _ = fns["maps"]("shapes", "Last edit", "", "", 0, 2, 7.5, "", state)
    assert figure.size[0] > 0
    with pytest.raises(gr.Error, match="No edit yet"):
        fns["maps"]("shapes", "Last edit", "", "", 0, 2, 7.5, "", None)
    with pytest.raises(gr.Error, match="Invert an image first"):
        fns["edit_real"]("shapes", None, EDITED, "replace", "", "", 0.8, "", 0.4, "default", "", None)
    gallery, info = fns["speed"]("shapes", SOURCE, ["agent", "window"], "window:shift=none", 0, 3, 7.5, "32x32")
    assert [caption.split(":")[0] for _, caption in gallery] == ["stock", "agent", "window"]
    assert "| window |" in info and "s / step" in info
    with pytest.raises(gr.Error, match="tick at least one"):
        fns["speed"]("shapes", SOURCE, [], "", 0, 3, 7.5, "32x32")
    with pytest.raises(gr.Error, match="no option 'sift'"):
        fns["speed"]("shapes", SOURCE, ["window"], "window:sift=none", 0, 3, 7.5, "32x32")
    with pytest.raises(gr.Error, match="not ticked"):
        fns["speed"]("shapes", SOURCE, ["agent"], "window:shift=none", 0, 3, 7.5, "32x32")


def test_launch_listens_on_loopback_and_limits_uploads():
    """The served app (no model loaded): 127.0.0.1, no share link, uploads over max_file_size refused,
    files on disk outside Gradio's cache not served."""
    pytest.importorskip("gradio")
    import socket

    import httpx

    from attnctrl.app import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(None, port=port, preload=False, prevent_thread_lock=True, quiet=True, max_file_size="1kb")
    try:
        assert demo.server_name == "127.0.0.1" and demo.share is False
        base = f"http://127.0.0.1:{port}/gradio_api"
        big = httpx.post(f"{base}/upload", files={"files": ("x.png", b"0" * 2048, "image/png")}, timeout=60)
        assert big.status_code == 413
        small = httpx.post(f"{base}/upload", files={"files": ("x.png", b"0" * 100, "image/png")}, timeout=60)
        assert small.status_code == 200
        for path in ("/etc/passwd", str(Path(SHAPES) / "model_index.json")):
            assert httpx.get(f"{base}/file={path}", timeout=60).status_code == 403
    finally:
        demo.close()


def test_examples_are_valid_forms():
    pytest.importorskip("gradio")
    from attnctrl.app.ui import EDIT_EXAMPLES

    for source, edited, mode, weights, blend in EDIT_EXAMPLES:
        form = options.edit_form(source, edited, mode, weights, blend, 0.8, "", 0.4)
        assert len(form.prompts) == 2
