"""``attnctrl batch``: validation, a run with a failing job, resuming, and two processes under accelerate."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from attnctrl.cli.batch import BatchFileError, load_jobs
from attnctrl.cli import main

PROMPT = "a red circle on the left"
EDITED = "a blue circle on the left"
GENERATE = {"id": "gen", "kind": "generate", "prompt": PROMPT, "steps": 2, "seed": 3}
EDIT = {"id": "swap", "kind": "edit", "prompt": PROMPT, "to": EDITED, "steps": 2, "blend": ["circle"], "weights": {"blue": 2.0}}
FAILING = {"id": "broken", "kind": "generate", "prompt": PROMPT, "steps": 2, "model": "/no/such/model/folder"}


def write_jobs(path, *jobs, raw_lines=()):
    lines = [json.dumps(j) for j in jobs] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def read_results(out):
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def check_png(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"


@pytest.mark.parametrize(
    "job, line, field, words",
    [
        ({"id": "a", "kind": "edit", "prompt": PROMPT, "to": EDITED, "weights": {"tiger": 2.0}}, 2, "weights", ['word "tiger"', "blue"]),
        ({"id": "a", "kind": "edit", "prompt": PROMPT, "to": "a blue circle"}, 2, "to", ["refine"]),
        ({"id": "a", "kind": "generate", "prompt": PROMPT, "steps": 0}, 2, "steps", ["at least 1"]),
        ({"id": "a", "kind": "generate", "prompt": PROMPT, "size": "30x30"}, 2, "size", ["multiples of 8"]),
        ({"id": "a", "kind": "generate", "prompt": PROMPT, "colour": "red"}, 2, "colour", ["not a field"]),
        ({"id": "a", "kind": "paint", "prompt": PROMPT}, 2, "kind", ["generate", "consistent"]),
        ({"id": "../x", "kind": "generate", "prompt": PROMPT}, 2, "id", ["folder name"]),
        ({"id": "a", "kind": "edit", "prompt": PROMPT, "to": EDITED, "cross": {"default": 0.8, "dog": 0.4}}, 2, "cross", ['word "dog"']),
        ({"id": "a", "kind": "edit", "prompt": PROMPT, "to": EDITED, "weights": {"blue": float("nan")}}, 2, "weights", ["finite"]),
        ({"id": "a", "kind": "invert-and-edit", "prompt": PROMPT, "to": EDITED, "image": "missing.png"}, 2, "image", ["no such file"]),
        ({"id": "a", "kind": "consistent", "subjects": [{"name": "c", "prompt": "a red circle", "word": "square"}],
          "scenes": ["a red circle"]}, 2, "subjects", ['word "square"']),
        ({"id": "gen", "kind": "generate", "prompt": PROMPT}, 2, "id", ["already the id of line 1"]),
        ({"id": "a", "kind": "edit", "prompt": PROMPT, "to": EDITED, "source_context": "yes"}, 2, "source_context", ["true, false"]),
    ],
)
def test_invalid_file_names_line_and_field(tmp_path, capsys, job, line, field, words):
    jobs = write_jobs(tmp_path / "jobs.jsonl", GENERATE, job)
    out = tmp_path / "out"
    assert main(["batch", jobs, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: jobs.jsonl line {line}: "{field}": '), err
    for word in words:
        assert word in err
    assert len(err.splitlines()) == 1
    assert not out.exists()  # nothing ran, nothing written


def test_invalid_json_and_empty_file(tmp_path):
    with pytest.raises(BatchFileError, match=r"jobs.jsonl line 3: not valid JSON"):
        load_jobs(write_jobs(tmp_path / "jobs.jsonl", GENERATE, raw_lines=["# a comment", "{oops"]))
    with pytest.raises(BatchFileError, match="no jobs"):
        load_jobs(write_jobs(tmp_path / "jobs.jsonl", raw_lines=["", "# nothing"]))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    jobs = write_jobs(folder / "jobs.jsonl", GENERATE, EDIT, FAILING)
    out = str(folder / "out")
    code = main(["batch", jobs, "--out", out, "--no-progress"])
    return folder, jobs, out, code, read_results(out)


def test_run_records_every_job_and_fails_with_code_1(first_run):
    _, _, out, code, results = first_run
    assert code == 1
    assert [r["id"] for r in results] == ["gen", "swap", "broken"]
    assert [r["status"] for r in results] == ["ok", "ok", "failed"]
    gen, swap, broken = results
    assert gen["outputs"] == ["gen/image.png"] and gen["seed"] == 3
    assert swap["outputs"] == ["swap/source.png", "swap/edit_1.png"] and swap["seed"] == 0
    for r in (gen, swap):
        assert r["seconds"] >= 0 and "error" not in r
        for name in r["outputs"]:
            check_png(os.path.join(out, name))
        record = json.load(open(os.path.join(out, r["id"], "job.json"), encoding="utf-8"))
        assert len(record["hash"]) == 64 and record["outputs"] == [os.path.basename(o) for o in r["outputs"]]
    assert broken["outputs"] == [] and "/no/such/model/folder" in broken["error"]
    assert not os.path.exists(os.path.join(out, "broken", "job.json"))
    assert not [f for f in os.listdir(out) if f.startswith("results.part-")]


def test_rerun_skips_finished_jobs_and_reruns_changed_ones(first_run, tmp_path):
    folder, _, out, _, _ = first_run
    out2 = str(tmp_path / "out")
    shutil.copytree(out, out2)
    image = os.path.join(out2, "gen", "image.png")
    before = os.stat(image).st_mtime_ns

    jobs = write_jobs(tmp_path / "jobs.jsonl", GENERATE, EDIT, FAILING)
    assert main(["batch", jobs, "--out", out2, "--no-progress"]) == 1
    assert [r["status"] for r in read_results(out2)] == ["skipped", "skipped", "failed"]
    assert read_results(out2)[0]["outputs"] == ["gen/image.png"]

    changed = dict(EDIT, seed=7)
    jobs = write_jobs(tmp_path / "jobs.jsonl", GENERATE, changed)
    assert main(["batch", jobs, "--out", out2, "--no-progress"]) == 0
    results = read_results(out2)
    assert [(r["id"], r["status"]) for r in results] == [("gen", "skipped"), ("swap", "ok")]
    assert results[1]["seed"] == 7
    assert os.stat(image).st_mtime_ns == before

    os.unlink(os.path.join(out2, "swap", "edit_1.png"))  # a missing output: the job runs again
    assert main(["batch", jobs, "--out", out2, "--no-progress"]) == 0
    assert [r["status"] for r in read_results(out2)] == ["skipped", "ok"]
    check_png(os.path.join(out2, "swap", "edit_1.png"))


def _accelerate_launcher() -> list[str] | None:
    if importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("accelerate.commands.launch") is None:
        return None
    return [sys.executable, "-m", "accelerate.commands.launch"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_under_accelerate(tmp_path):
    launcher = _accelerate_launcher()
    if launcher is None:
        pytest.skip("accelerate (and its launcher, accelerate.commands.launch) is not installed")
    jobs = [dict(GENERATE, id=f"g{k}", seed=k) for k in range(3)] + [dict(EDIT, id="e0"), dict(FAILING, id="f0")]
    path = write_jobs(tmp_path / "jobs.jsonl", *jobs)
    out = str(tmp_path / "out")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ACCELERATE_CONFIG_FILE=str(tmp_path / "none.yaml"))
    # accelerate's --cpu starts one process unless an MPI hostfile is given; torchrun's launcher
    # (--multi_gpu) starts real processes, which use gloo on CPU (attnctrl passes cpu=True to PartialState).
    cmd = launcher + ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                      "-m", "attnctrl", "batch", path, "--out", out, "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    if not os.path.exists(os.path.join(out, "results.jsonl")) and "attnctrl" not in proc.stderr + proc.stdout:
        pytest.skip(f"accelerate's launcher could not start processes here: {proc.stderr[-500:]}")
    assert proc.returncode != 0, "a failed job must make the launch fail"
    results = read_results(out)
    assert sorted(r["id"] for r in results) == sorted(j["id"] for j in jobs)  # every job exactly once
    assert [r["id"] for r in results] == [j["id"] for j in jobs]  # in file order
    assert {r["process"] for r in results if "process" in r} == {0, 1}, results
    assert {r["id"]: r["process"] for r in results} == {j["id"]: k % 2 for k, j in enumerate(jobs)}
    statuses = {r["id"]: r["status"] for r in results}
    assert statuses == {"g0": "ok", "g1": "ok", "g2": "ok", "e0": "ok", "f0": "failed"}
    for r in results:
        for name in r["outputs"]:
            check_png(os.path.join(out, name))
    assert not [f for f in os.listdir(out) if f.startswith("results.part-")]


def test_killed_batch_resumes_with_every_output_complete_and_made_once(tmp_path):
    """SIGKILL in the middle of a run, then rerun: every job's PNG opens and no finished job runs twice."""
    import signal
    import time

    jobs = [dict(GENERATE, id=f"k{k}", seed=k, steps=3) for k in range(6)]
    path = write_jobs(tmp_path / "jobs.jsonl", *jobs)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "attnctrl", "batch", path, "--out", str(out), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / "results.part-0.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if part.exists() and part.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.skip("the batch finished before it could be killed")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done_before = {json.loads(line)["id"] for line in part.read_text().splitlines() if line.strip()}
    assert 2 <= len(done_before) < len(jobs)
    assert not (out / "results.jsonl").exists()

    assert main(["batch", path, "--out", str(out), "--no-progress"]) == 0
    results = read_results(str(out))
    assert [r["id"] for r in results] == [j["id"] for j in jobs]
    for r in results:
        assert r["status"] == ("skipped" if r["id"] in done_before else "ok"), r
        check_png(out / r["outputs"][0])
        assert sorted(os.listdir(out / r["id"])) == ["image.png", "job.json"]  # no temporary files left


def test_shared_window_is_hashed_for_replace_and_reaches_the_edit(tmp_path):
    from attnctrl.cli.batch import _build

    base = {"kind": "edit", "prompt": PROMPT, "to": EDITED}
    jobs = load_jobs(write_jobs(tmp_path / "jobs.jsonl", {"id": "a", **base}, {"id": "b", **base, "shared": "off"},
                                {"id": "c", **base, "shared": [0.1, 0.9]}, {"id": "d", **base, "mode": "refine"}))
    a, b, c, d = jobs
    assert a.params["shared"] == "default" and b.params["shared"] == "off" and c.params["shared"] == [0.1, 0.9]
    assert len({a.hash, b.hash, c.hash}) == 3 and "shared" not in d.params
    assert _build(a.params).shared_steps is None and _build(b.params).shared_steps == (0.0, 0.8)  # off: the cross window
    assert _build(c.params).shared_steps == (0.1, 0.9) and not hasattr(_build(d.params), "shared_steps")
    (t,) = load_jobs(write_jobs(tmp_path / "t.jsonl", {"id": "t", **base, "blend": ["circle"], "blend_threshold": 0.6}))
    assert t.params["blend_threshold"] == 0.6 and _build(t.params).blend.threshold == 0.6
    assert "blend_threshold" not in a.params  # absent: the hash of a job without it is unchanged
    for bad, message in (({"mode": "refine", "shared": 0.5}, "replace edits only"), ({"shared": "all"}, "shared"),
                         ({"blend_threshold": 0.5}, "needs blend words"),
                         ({"blend": ["circle"], "blend_threshold": 2}, r"\[0, 1\]")):
        path = write_jobs(tmp_path / "bad.jsonl", {"id": "x", **base, **bad})
        with pytest.raises(BatchFileError, match=message):
            load_jobs(path)


def test_source_context_is_hashed_for_replace_and_reaches_the_edit(tmp_path):
    from attnctrl.cli.batch import _build

    base = {"kind": "edit", "prompt": PROMPT, "to": EDITED}
    jobs = load_jobs(write_jobs(tmp_path / "jobs.jsonl", {"id": "a", **base}, {"id": "b", **base, "source_context": False},
                                {"id": "c", **base, "mode": "refine"}, {"id": "d", **base, "mode": "refine", "source_context": True}))
    a, b, c, d = jobs
    # replace always carries the key (its default output changed: older finished jobs rerun); refine only when given
    assert a.params["source_context"] is None and b.params["source_context"] is False and a.hash != b.hash
    assert "source_context" not in c.params and d.params["source_context"] is True
    assert _build(b.params).source_context is False and _build(d.params).source_context is True
    assert _build(a.params).source_context is None
