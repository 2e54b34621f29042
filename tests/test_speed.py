"""``attnctrl.pipelines.speed``: policy specs and the stock-vs-policy comparison (CLI ``speed``, ``edit --efficient``, batch)."""

from __future__ import annotations

import json

import pytest
import torch

import attnctrl
from attnctrl import cli
from attnctrl.pipelines.speed import compare_speed, parse_policy, policy_label

PROMPT = "a photo of a cat on the grass"


def test_parse_policy_builds_validated_configs():
    assert parse_policy(None) is None and parse_policy(" none ") is None and parse_policy("stock") is None
    agent = parse_policy("agent:agents=pool,steps=0,0.6,use_rand=false")
    assert agent == attnctrl.AgentAttention(agents="pool", steps=(0.0, 0.6), use_rand=False)
    assert parse_policy("Window") == attnctrl.WindowAttention()
    assert isinstance(parse_policy("grouped"), attnctrl.GroupedAttention)
    assert isinstance(parse_policy("proxy"), attnctrl.ProxyAttention)
    names = ("agent", "agentsd", "proxy", "grouped", "window")
    assert [policy_label(parse_policy(n)) for n in names] == list(names)
    assert parse_policy("agentsd") == attnctrl.AgentAttention.agentsd()
    assert parse_policy("agentsd:merge_ratio=0.3,sx=2,sy=2") == attnctrl.AgentAttention.agentsd(merge_ratio=0.3, sx=2, sy=2)
    assert parse_policy("agent:merge_ratio=0.4,tome_after=true").tome_after is True
    with pytest.raises(ValueError, match="use one of agent, agentsd, window, proxy, grouped"):
        parse_policy("tome")
    with pytest.raises(ValueError, match="no option 'ratio'; options: agents"):
        parse_policy("agent:ratio=0.5")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_policy("agent:pool")
    with pytest.raises(ValueError, match="agents must be 'merge' or 'pool'"):
        parse_policy("agent:agents=mean")


def test_compare_speed_same_noise_and_policy_removed(sd_pipe):
    before = dict(sd_pipe.unet.attn_processors)
    report = compare_speed(sd_pipe, PROMPT, [attnctrl.AgentAttention(agents="pool", steps=1.0)], steps=3, size=(32, 32))
    assert [r.label for r in report.runs] == ["stock", "agent"]
    assert all(len(r.step_seconds) == 3 and r.seconds_per_step > 0 for r in report.runs)
    assert report.speedup(report.stock) == 1.0
    assert report.size == (32, 32) and "| agent |" in report.table()
    assert dict(sd_pipe.unet.attn_processors) == before  # the policy is gone again
    again = compare_speed(sd_pipe, PROMPT, [attnctrl.AgentAttention(agents="pool", steps=0.0)], steps=3, size=(32, 32))
    # a policy that is never active gives the stock image: same noise for every run
    assert again.runs[0].image.tobytes() == again.runs[1].image.tobytes()
    with pytest.raises(ValueError, match="at least one"):
        compare_speed(sd_pipe, PROMPT, [], steps=1)


@pytest.fixture(scope="module")
def model_dir(sd_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd-speed")
    sd_pipe.save_pretrained(path)
    return str(path)


def test_speed_command(model_dir, tmp_path, capsys):
    out = tmp_path / "speed"
    code = cli.main(["speed", "--model", model_dir, "--efficient", "agent:agents=pool", "--efficient", "window",
                     "--prompt", PROMPT, "--steps", "3", "--size", "32x32", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "speed.json").read_text())
    assert [r["policy"] for r in record["runs"]] == ["stock", "agent", "window"]
    for name in ("stock.png", "agent.png", "window.png", "grid.png"):
        assert (out / name).is_file()
    assert "| window |" in capsys.readouterr().out


def test_speed_and_edit_reject_bad_policies(model_dir, tmp_path, capsys):
    assert cli.main(["speed", "--model", model_dir, "--efficient", "tome", "--out", str(tmp_path)]) == 2
    assert "--efficient: unknown efficient-attention policy 'tome'" in capsys.readouterr().err
    code = cli.main(["edit", "--model", model_dir, "--prompt", PROMPT, "--to", "a photo of a dog on the grass",
                     "--efficient", "window", "--materialise", "--out", str(tmp_path)])
    assert code == 2 and "--materialise" in capsys.readouterr().err
    code = cli.main(["edit", "--model", model_dir, "--prompt", PROMPT, "--to", "a photo of a dog on the grass",
                     "--efficient", "window", "--image", "missing.png", "--method", "dpl", "--out", str(tmp_path)])
    assert code == 2 and "--method dpl" in capsys.readouterr().err


def test_edit_with_efficient_attention(model_dir, tmp_path):
    out = tmp_path / "edit"
    code = cli.main(["edit", "--model", model_dir, "--prompt", PROMPT, "--to", "a photo of a dog on the grass",
                     "--efficient", "agent:agents=pool,steps=1.0", "--steps", "2", "--size", "32x32", "--out", str(out)])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["efficient"].startswith("AgentAttention(agents='pool'")


def test_batch_jobs_take_a_policy(model_dir, tmp_path):
    from attnctrl.cli.batch import BatchFileError, load_jobs

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "a", "kind": "generate", "prompt": PROMPT, "efficient": "window:shift=none",
                                "steps": 2, "size": "32x32"}) + "\n")
    [job] = load_jobs(str(jobs), model=model_dir)
    assert job.params["efficient"] == "window:shift=none"
    jobs.write_text(json.dumps({"id": "a", "kind": "generate", "prompt": PROMPT, "efficient": "window:sift=1"}) + "\n")
    with pytest.raises(BatchFileError, match='"efficient"'):
        load_jobs(str(jobs), model=model_dir)
    out = tmp_path / "out"
    jobs.write_text(json.dumps({"id": "a", "kind": "generate", "prompt": PROMPT, "efficient": "agent:agents=pool",
                                "steps": 2, "size": "32x32"}) + "\n")
    assert cli.main(["batch", str(jobs), "--model", model_dir, "--out", str(out)]) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert results[0]["status"] == "ok" and (out / "a" / "image.png").is_file()
