"""Hostile input: every case ends as exit code 2 / a typed error with a message, before any work and
with nothing written; and the option grammar, fuzzed, only ever gives a result or a typed error."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from attnctrl import Reweight
from attnctrl.cli import main
from attnctrl.cli import options as grammar
from attnctrl.cli import run as cli_run
from attnctrl.cli.batch import BatchFileError, load_jobs
from attnctrl.errors import AttnctrlError, InvalidWeightError, TruncatedWordError
from attnctrl.inversion import Inversion

PROMPT, EDITED = "a red circle on the left", "a blue circle on the left"


@pytest.fixture
def no_model(monkeypatch):
    """Every case below must be refused before a model is loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli_run, "load_model", refuse)


def refused(argv, capsys, message, out=None):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    if out is not None:
        assert not os.path.exists(out) or os.path.isfile(out)


@pytest.mark.parametrize("weight", ["blue=1e30", "blue=1e39", "blue=-150", "blue=nan"])
def test_huge_or_non_finite_weights(weight, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    message = "not a finite number" if "nan" in weight else "out of range"
    refused(["edit", "--prompt", PROMPT, "--to", EDITED, "--weight", weight, "--out", str(out)], capsys, message, out)
    jobs = tmp_path / "jobs.jsonl"
    factor = weight.split("=")[1]
    jobs.write_text(json.dumps({"id": "a", "kind": "edit", "prompt": PROMPT, "to": EDITED,
                                "weights": {"blue": float(factor)}}) + "\n")
    with pytest.raises(BatchFileError, match="finite|out of range"):
        load_jobs(str(jobs))
    if "nan" not in weight:
        with pytest.raises(InvalidWeightError):
            Reweight({"blue": float(factor)})


def test_out_is_a_regular_file(tmp_path, capsys, no_model):
    out = tmp_path / "taken"
    out.write_text("keep me")
    refused(["edit", "--prompt", PROMPT, "--to", EDITED, "--out", str(out)], capsys, "is not a folder")
    assert out.read_text() == "keep me"
    refused(["edit", "--prompt", PROMPT, "--to", EDITED, "--out", str(out / "below")], capsys, "is a file")


def test_prompt_that_is_not_utf8(tmp_path, capsys, no_model):
    bad = b"a red \xff circle".decode("utf-8", "surrogateescape")  # what Python makes of such argv
    out = tmp_path / "out"
    refused(["edit", "--prompt", bad, "--to", EDITED, "--out", str(out)], capsys, "not valid UTF-8", out)
    refused(["invert", "img.png", "--prompt", bad, "-o", str(tmp_path / "x.safetensors")], capsys, "not valid UTF-8")


@pytest.mark.parametrize("text, culprit", [
    (b"a red \xff circle".decode("utf-8", "surrogateescape"), "bytes b'\\xff'"),
    ("a red \udd00 circle", "lone surrogate U+DD00"),  # not from argv: a JSON batch file or a form
    ("\ud800", "lone surrogate U+D800"),
])
def test_check_prompt_names_what_is_not_utf8(text, culprit):
    with pytest.raises(grammar.OptionError) as info:
        grammar.check_prompt(text)
    assert "not valid UTF-8" in str(info.value) and culprit in str(info.value)


def test_decompression_bomb_and_devices_as_images(tmp_path, capsys, no_model, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    refused(["invert", str(bomb), "--prompt", PROMPT, "-o", str(tmp_path / "x.safetensors")], capsys, "decompression bomb")
    if os.path.exists("/dev/zero"):
        refused(["invert", "/dev/zero", "--prompt", PROMPT, "-o", str(tmp_path / "x.safetensors")], capsys,
                "not a regular file")
    refused(["invert", str(tmp_path / "missing.png"), "--prompt", PROMPT, "-o", str(tmp_path / "x.safetensors")],
            capsys, "does not exist")
    assert not (tmp_path / "x.safetensors").exists()


def _inversion(**changes) -> Inversion:
    fields = dict(
        method="ddim", prompts=(PROMPT,), latents=torch.zeros(3, 1, 4, 8, 8), timesteps=torch.tensor([500, 0]),
        guidance_scale=7.5, height=32, width=32, model={"name": "m", "class": "c", "fingerprint": []}, scheduler={},
    )
    fields.update(changes)
    return Inversion(**fields)


def _damaged(path, *, meta=None, drop=None, tensors=None):
    """A copy of a valid inversion file with its metadata text or tensors changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = _inversion().save(str(path) + ".good.safetensors")
    with safe_open(good, framework="pt") as f:
        text = f.metadata()["attnctrl"]
        data = {k: f.get_tensor(k) for k in f.keys()}
    if drop:
        data.pop(drop)
    data.update(tensors or {})
    save_file(data, str(path), metadata={"attnctrl": meta(text) if meta else text})
    return str(path)


def _without(key):
    def change(text):
        meta = json.loads(text)
        meta.pop(key)
        return json.dumps(meta)
    return change


@pytest.mark.parametrize("damage, message", [
    (dict(meta=lambda text: text[:-5]), "not valid JSON"),
    (dict(meta=lambda text: "[" * 100_000 + "]" * 100_000), "not valid JSON"),
    (dict(meta=_without("method")), "'method' missing"),
    (dict(drop="latents"), "'latents' missing"),
    (dict(tensors={"latents": torch.full((3, 1, 4, 8, 8), float("nan"))}), "NaN"),
    (dict(tensors={"latents": torch.zeros(3, 1, 4, 7, 8)}), "does not match the latents"),
    (dict(meta=lambda text: text.replace('"height": 32', '"height": "tall"')), "damaged"),
], ids=["json", "deep-json", "missing-key", "missing-tensor", "nan-latents", "size-mismatch", "wrong-type"])
def test_damaged_inversion_files(damage, message, tmp_path, capsys, no_model):
    path = _damaged(tmp_path / "inv.safetensors", **damage)
    out = tmp_path / "out"
    refused(["edit", "--prompt", PROMPT, "--to", EDITED, "--inversion", path, "--out", str(out)], capsys, message, out)


def test_batch_ids_that_collide_with_its_own_files(tmp_path):
    for job_id in ("results.jsonl", "RESULTS.JSONL", "results.part-0.jsonl"):
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text(json.dumps({"id": job_id, "kind": "generate", "prompt": PROMPT}) + "\n")
        with pytest.raises(BatchFileError, match="file the batch writes"):
            load_jobs(str(jobs))
    jobs.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(BatchFileError, match="not valid JSON|nested too deeply"):
        load_jobs(str(jobs))


def test_weight_on_a_word_past_the_token_limit(tokenizer):
    from attnctrl.plan import compile_edit

    long = "a cat " + "on the grass " * 10 + "with a dog"  # "dog" lies past the 16-token test limit
    with pytest.raises(TruncatedWordError, match="token limit"):
        compile_edit(Reweight({"dog": 2.0}), tokenizer, [long, long])


def test_size_beyond_free_memory(tmp_path, capsys, monkeypatch, sd_pipe):
    monkeypatch.setattr(cli_run, "load_model", lambda *args, **kwargs: sd_pipe)
    monkeypatch.setattr(cli_run, "available_memory", lambda device: 2**30)  # 1 GiB free
    monkeypatch.setattr(sd_pipe, "__call__", lambda *a, **k: pytest.fail("generated"), raising=False)
    out = tmp_path / "out"
    refused(["edit", "--prompt", "a photo of a cat", "--to", "a photo of a dog", "--size", "8192x8192",
             "--out", str(out)], capsys, "needs about", out)
    assert not out.exists()


def test_saved_files_follow_the_umask(tmp_path):
    from attnctrl.io import atomic_write_bytes

    previous = os.umask(0o027)
    try:
        path = atomic_write_bytes(tmp_path / "f.json", b"{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_results_do_not_outlive_a_killed_rerun(tmp_path, monkeypatch):
    """A rerun that dies before its summary leaves no results.jsonl describing the previous run."""
    from attnctrl.cli import batch

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"id": "a", "seed": 1, "status": "ok"}) + "\n")
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "kind": "generate", "prompt": PROMPT, "seed": 2, "steps": 1}) + "\n")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_run_job", killed)
    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(str(jobs), str(out), progress=False)
    assert not (out / "results.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# The grammar, fuzzed: a result or a typed error, never anything else
# ------------------------------------------------------------------------------------------------

TEXT = st.lists(st.characters() | st.sampled_from(
    list("0123456789.,=x@:-+eE ") + ["nan", "inf", "1e39", "\udcff", "×", "agent", "grouped:", "red=", "0.2,0.6"]),
    max_size=10).map("".join)


def _outcome(call):
    try:
        call()
    except AttnctrlError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(TEXT, max_size=4), text=TEXT, prompts=st.integers(min_value=1, max_value=4),
       mode=st.sampled_from(["replace", "refine", "reweight", "swap"]))
def test_grammar_gives_results_or_typed_errors(entries, text, prompts, mode):
    _outcome(lambda: grammar.parse_window(text, "w"))
    _outcome(lambda: grammar.parse_cross(entries))
    _outcome(lambda: grammar.parse_cross(entries, words_only=True))
    _outcome(lambda: grammar.parse_weights(entries))
    _outcome(lambda: grammar.parse_blend(entries, prompts))
    _outcome(lambda: grammar.parse_size(text))
    _outcome(lambda: grammar.parse_subject(text))
    _outcome(lambda: grammar.parse_file_size(text))
    _outcome(lambda: grammar.check_prompt(text))
    _outcome(lambda: grammar.parse_efficient(text))

    def edit():
        weights = grammar.parse_weights(entries)
        cross = grammar.parse_cross([e for e in entries if "=" not in e][:1] + [e for e in entries if "=" in e])
        blend = grammar.parse_blend(entries[:1], prompts)
        grammar.build_edit(mode, cross=cross, weights=weights, blend=blend)

    _outcome(edit)
