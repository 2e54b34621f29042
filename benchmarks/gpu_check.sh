#!/usr/bin/env bash
# The one-call GPU check: CUDA tests, every feature in fp16/bf16, the P2P / efficient-attention /
# Triton benchmarks, and a summary, all in one folder. See benchmarks/results/gpu/README.md.
#
# On the device machine, from the repository root, after `bash benchmarks/gpu_wheels.sh` here:
#     bash benchmarks/gpu_check.sh "$OUT"          (device call: carry [".whl"], timeout_s 420)
# Rehearsal on a CPU machine (tiny models, same plumbing, same output files):
#     GPU_CHECK_QUICK=1 GPU_CHECK_SITE=/tmp/attnctrl-site bash benchmarks/gpu_check.sh /tmp/gpu-out
#
# Output (at most 8 files, the device call's limit; nothing deeper): summary.md (environment, step
# statuses, test and feature failures, then every table), all.json (everything machine-readable),
# tests.txt, features.md, p2p.md, attention.md, triton.md, log.txt. Scratch files go to /tmp.
#
# Time: the whole script must end inside the device call's 420 s with room for the install and the
# summary, so every step runs under its own `timeout`, capped and also squeezed by one overall budget
# (GPU_CHECK_TOTAL_S, default 355 s after the start, the install included) that keeps a minimum for
# the steps after it; with the summary the script ends within 6 minutes.
# Budgets on an H200 (caps; a step that ends early leaves its time to the later ones):
#   tests      90 s  CUDA selection: test_kernels' CUDA parametrisations (sdpa/reference vs the
#                    float64 reference), test_triton's compiled-kernel tests, test_xformers' CUDA tests
#                    (they skip: no xformers on the device). The CPU-only suites run in CI, not here.
#   features   90 s  gpu_features.py --budget (cap - 20): sd15 + sdxl at 512², 3 steps, fp16 then bf16,
#                    then the CLI; features it cannot start in time are listed as skipped.
#   p2p       120 s  gpu_p2p_profile.py fp16 at 512 / 1024 / 2048 with 20 / 10 / 5 steps x 3 / 2 / 1
#                    repeats: one process, the SD 1.5-shaped UNet built on the GPU (the first check's
#                    per-variant processes spent ~20 s each on a CPU init and timed out), plain vs fused
#                    vs the forced kernel path, with a launch/sync profile at 512².
#   attention  90 s  attention.py fp16: layer N 4096/16384/65536 x head dim 40/64 x 8 variants, then
#                    one step of sd15 / sdxl / pixart at 1024, 2048, 4096 (sdpa, agent, window, proxy,
#                    grouped), size by size; --budget (cap - 20) skips what it cannot start in time.
#   taps       30 s  triton_taps.py at N = 16384 (taps, routed, dense; no two-pass), if the file exists.
# Every step continues when one fails; leftover processes of a step (benchmarks start their
# children in new sessions, which `timeout` does not reach) are found by an environment marker
# and killed by process id.
set -u -o pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
QUICK=${GPU_CHECK_QUICK:-0}  # 1: CPU rehearsal (tiny models; caps doubled for a slow CPU)
PART=${GPU_CHECK_PART:-main}  # main: the check above; mmdit: the MM-DiT check (SD3/Flux P2P, Flux policies)
PY=${GPU_CHECK_PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/site}
if [ "$QUICK" = 1 ]; then TOTAL=${GPU_CHECK_TOTAL_S:-700}; SCALE=2; else TOTAL=${GPU_CHECK_TOTAL_S:-355}; SCALE=1; fi
WORK=$(mktemp -d /tmp/attnctrl-gpu-check-XXXXXX)
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/log.txt"
STEPS="$WORK/steps.tsv"
: > "$LOG"
: > "$STEPS"

log() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG" >&2; }

# ---- install the carried wheels ------------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
    log "installing .whl/ into $SITE"
    [ -f .whl/MANIFEST.txt ] && sed 's/^/    /' .whl/MANIFEST.txt >> "$LOG"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >> "$LOG" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        # The wheel leaves the shapes model's weights out (gpu_wheels.sh) and may be older than the
        # tree: copy the tree's package files over it (the pyproject package-dir mapping).
        "$PY" - "$SITE" >> "$LOG" 2>&1 <<'PYEOF' || log "WARNING: copying the working tree over the installed attnctrl failed"
import shutil, sys
from pathlib import Path

site = Path(sys.argv[1]) / "attnctrl"
if not site.is_dir():
    raise SystemExit(f"{site} is missing: was the attnctrl wheel in .whl/?")
ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
for src, dst in (("attnctrl", site), ("processors", site / "processors"), ("pipelines", site / "pipelines"), ("app", site / "app")):
    if Path(src).is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True, ignore=ignore)
print(f"    working tree's attnctrl/, processors/, pipelines/, app/ copied over {site}")
PYEOF
    else
        log "WARNING: pip install of .whl/ failed (see above); going on with the environment as it is"
    fi
else
    log "no .whl/ here: using the python environment as it is (run 'bash benchmarks/gpu_wheels.sh' before the call)"
fi

# ---- environment -----------------------------------------------------------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "uname: $(uname -a)"
    echo "repo: $ROOT; quick rehearsal: $QUICK; python: $(command -v "$PY")"
    echo
    if command -v nvidia-smi > /dev/null; then
        timeout 20 nvidia-smi 2>&1
        timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
} > "$WORK/env.txt" 2>&1
timeout 120 "$PY" -P - "$WORK/env.json" >> "$WORK/env.txt" 2>&1 <<'PYEOF'
import importlib, json, platform, sys

info = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "triton", "diffusers", "transformers", "accelerate", "safetensors", "huggingface_hub", "numpy",
             "xformers", "tomesd", "attnctrl"):
    try:
        mod = importlib.import_module(name)
        info[name] = getattr(mod, "__version__", "?")
        if name == "attnctrl":
            info["attnctrl_file"] = mod.__file__
    except Exception as err:  # noqa: BLE001
        info[name] = f"not importable: {type(err).__name__}: {str(err)[:200]}"
try:
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gb=round(p.total_memory / 1e9, 1),
                    sm_count=p.multi_processor_count)
    from attnctrl.kernels import get_backend, registered_backends

    info["backends"] = {n: (get_backend(n).availability() or "available") for n in registered_backends()}
except Exception as err:  # noqa: BLE001
    info["error"] = f"{type(err).__name__}: {str(err)[:300]}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
PYEOF
log "environment recorded ($(grep -m1 '"gpu"' "$WORK/env.json" 2>/dev/null | tr -d ' ,' || echo 'no GPU'))"

# ---- steps ---------------------------------------------------------------------------------------------
kill_leftovers() {  # processes that still carry the step's marker (children in their own sessions)
    local marker=$1 e pid
    for e in /proc/[0-9]*/environ; do
        pid=${e#/proc/}
        pid=${pid%/environ}
        [ "$pid" = "$$" ] && continue
        if { tr '\0' '\n' < "$e"; } 2> /dev/null | grep -qxF "ATTNCTRL_GPU_CHECK_STEP=$marker"; then
            log "  killing leftover process $pid: $(tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | cut -c1-150)"
            kill -9 "$pid" 2> /dev/null
        fi
    done
}

# run_step NAME CAP_S RESERVE_S MARGIN_S LOGFILE CMD...
#   limit = min(CAP_S, time left of the overall budget - RESERVE_S kept for the later steps);
#   __LIMIT__ / __BUDGET__ in CMD become the limit and limit - MARGIN_S (the command's own budget).
run_step() {
    local name=$1 cap=$(($2 * SCALE)) reserve=$(($3 * SCALE)) margin=$4 logf=$5
    shift 5
    local now left limit start rc secs status
    now=$(date +%s)
    left=$((T0 + TOTAL - now - reserve))
    limit=$cap
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
        log "$name: skipped (${left}s left of the ${TOTAL}s budget after keeping ${reserve}s for later steps)"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "skipped: no time left" 0 "$limit" "" >> "$STEPS"
        return
    fi
    local args=("${@//__LIMIT__/$limit}")
    args=("${args[@]//__BUDGET__/$((limit - margin))}")
    log "$name: start (limit ${limit}s): ${args[*]}"
    start=$(date +%s)
    env ATTNCTRL_GPU_CHECK_STEP="$name.$$" timeout -k 10 "$limit" "${args[@]}" > "$logf" 2>&1
    rc=$?
    secs=$(($(date +%s) - start))
    kill_leftovers "$name.$$"
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out" ;;
        *) status="exit $rc" ;;
    esac
    log "$name: $status after ${secs}s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$limit" "${args[*]}" >> "$STEPS"
}

if [ "$QUICK" = 1 ]; then
    DEV=cpu
    FEATURES=(--device cpu --quick)
    P2P=(--device cpu --dtype fp32 --sizes 64 --steps 1 --repeats 1 --variants plain fused --no-profile)
    ATTN=(--device cpu --dtype float32 --tokens 256 --head-dims 40 --layer-variants sdpa agent grouped
          --model sd15 pixart --size 64 --tiny-models --variants sdpa agent window grouped --repeats 1 --isolate run)
else
    DEV=cuda
    FEATURES=(--device cuda)
    P2P=(--device cuda --dtype fp16 --sizes 512 1024 2048 --steps 20 10 5 --repeats 3 2 1 --budget 100)
    ATTN=(--device cuda --dtype float16 --tokens 4096 16384 65536 --head-dims 40 64
          --model sd15 sdxl pixart --size 1024 2048 4096 --variants sdpa agent window proxy grouped --repeats 3)
fi

if [ "$PART" = mmdit ]; then
    # The MM-DiT check (GPU_CHECK_PART=mmdit, a second device call): its CUDA tests, fused P2P vs the
    # stock pipeline on SD3.5-medium- and Flux.1-dev-shaped transformers (full depth, random weights),
    # and the efficient policies on the Flux-shaped transformer at 1024² and 2048².
    MM_P2P=(--device cuda --dtype fp16 --sizes 1024 2048 --steps 10 5 --repeats 2 1 --variants plain fused --no-profile)
    MM_FLUX=(--device cuda --dtype bf16 --model flux --sizes 1024 --steps 5 --repeats 2 --variants plain fused --no-profile)
    MM_ATTN=(--device cuda --dtype bfloat16 --model flux --size 1024 2048 --variants sdpa window proxy grouped --repeats 2)
    if [ "$QUICK" = 1 ]; then
        MM_P2P=(--device cpu --dtype fp32 --layers 1 --sizes 64 --steps 1 --repeats 1 --variants plain fused --no-profile)
        MM_FLUX=(--device cpu --dtype fp32 --model flux --layers 2 --sizes 64 --steps 1 --repeats 1 --variants plain fused --no-profile)
        MM_ATTN=(--device cpu --dtype float32 --model flux --flux-blocks 1 1 --size 64 --variants sdpa window --repeats 1)
    fi
    run_step tests 60 240 0 "$WORK/tests.log" \
        "$PY" -P -m pytest -q -p no:cacheprovider -rfEs --timeout 120 --junitxml "$WORK/junit.xml" \
        tests/test_kernels.py tests/test_mmdit.py tests/test_flow_inversion.py -k "cuda or lse"
    run_step p2p 150 100 20 "$WORK/p2p.log" \
        "$PY" benchmarks/gpu_p2p_profile.py --model sd3 "${MM_P2P[@]}" --budget __BUDGET__ --out "$WORK/p2p"
    run_step p2p-flux 80 60 20 "$WORK/p2p-flux.log" \
        "$PY" benchmarks/gpu_p2p_profile.py "${MM_FLUX[@]}" --budget __BUDGET__ --out "$WORK/p2p/flux"
    run_step attention 90 0 20 "$WORK/attention.log" \
        "$PY" benchmarks/attention.py "${MM_ATTN[@]}" --part unet --budget __BUDGET__ --timeout __LIMIT__ --out "$WORK/attention"
else
# (a) CUDA tests (run with -P: the repository root must not shadow the installed package)
run_step tests 90 180 0 "$WORK/tests.log" \
    "$PY" -P -m pytest -q -p no:cacheprovider -rfEs --timeout 120 --junitxml "$WORK/junit.xml" \
    tests/test_kernels.py tests/test_triton.py tests/test_xformers.py tests/test_mmdit.py -k cuda
# (b) every feature, fp16 and bf16
run_step features 90 120 20 "$WORK/features.log" \
    "$PY" benchmarks/gpu_features.py "${FEATURES[@]}" --budget __BUDGET__ --out "$WORK/features"
# (c) Prompt-to-Prompt cost vs plain SDPA (and the materialised reference)
run_step p2p 120 60 0 "$WORK/p2p.log" \
    "$PY" benchmarks/gpu_p2p_profile.py "${P2P[@]}" --out "$WORK/p2p"
# (d) efficient attention: layer and denoiser-step sweep
run_step attention 90 15 20 "$WORK/attention.log" \
    "$PY" benchmarks/attention.py "${ATTN[@]}" --part all --budget __BUDGET__ --timeout __LIMIT__ --out "$WORK/attention"
fi
# (e) Triton taps (another benchmark's file; optional)
if [ "$PART" = mmdit ]; then
    log "taps: not part of the MM-DiT check"
elif [ -f benchmarks/triton_taps.py ]; then
    # the targets first: fused taps vs sdpa + probabilities, routed vs flex, at N = 16384 (two-pass
    # variant and larger sizes left out: flex and the tuner compile, and the step has 30 s)
    TAPS=(--sizes 16384 --parts taps routed dense --no-two-pass)
    [ "$QUICK" = 1 ] && TAPS=(--interpret)  # its CPU smoke mode (Triton interpreter, tiny sizes)
    run_step taps 30 0 0 "$WORK/taps.log" "$PY" benchmarks/triton_taps.py "${TAPS[@]}" --out "$WORK/triton"
else
    log "taps: benchmarks/triton_taps.py is not in this tree: skipped"
    printf '%s\t%s\t%s\t%s\t%s\n' taps "skipped: benchmarks/triton_taps.py absent" 0 0 "" >> "$STEPS"
fi

# ---- (f) summary: combine everything into the output folder -------------------------------------
log "summary"
"$PY" - "$WORK" "$OUT" "$DEV" "$QUICK" "$ROOT" <<'PYEOF' 2>> "$LOG" || log "WARNING: the summary script failed (see above)"
import json, shutil, sys, xml.etree.ElementTree as ET
from pathlib import Path

work, out, device, quick, root = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1", Path(sys.argv[5])


def read(path, default=""):
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return default


def load(path):
    try:
        return json.loads(read(path))
    except ValueError:
        return None


def tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


steps = []
for line in read(work / "steps.tsv").splitlines():
    name, status, secs, limit, cmd = (line.split("\t") + [""] * 5)[:5]
    steps.append({"step": name, "status": status, "seconds": int(secs or 0), "limit_s": int(limit or 0), "command": cmd})
status_of = {s["step"]: s["status"] for s in steps}
env = load(work / "env.json") or {}

# tests
tests = {"counts": {}, "failures": []}
try:
    root_el = ET.parse(work / "junit.xml").getroot()
    suites = [root_el] if root_el.tag == "testsuite" else list(root_el)
    for key in ("tests", "failures", "errors", "skipped"):
        tests["counts"][key] = sum(int(s.get(key, 0)) for s in suites)
    tests["counts"]["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 1)
    for case in root_el.iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                tests["failures"].append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                          "message": (msg[0] if msg else "")[:300]})
except (OSError, ET.ParseError) as err:
    tests["error"] = f"no junit report: {err}"
tests_log = read(work / "tests.log", "(no test output)")
shutil.copyfile(work / "tests.log", out / "tests.txt") if (work / "tests.log").exists() else (out / "tests.txt").write_text(tests_log)

# per-step markdown: the step's own tables, or the end of its log when it wrote none
def step_md(step, files, title):
    parts = [read(f) for f in files if Path(f).exists()]
    text = "\n\n".join(p.strip() for p in parts if p.strip())
    note = f"_{title}: step status **{status_of.get(step, 'not run')}**._"
    if not text:
        text = f"No table was written. End of the step's log:\n\n```\n{tail(read(work / f'{step}.log', '(no log)'), 80)}\n```"
    return f"{note}\n\n{text}\n"

features = load(work / "features" / "features.json") or {}
p2p = load(work / "p2p" / "p2p_profile.json")
attention = load(work / "attention" / "attention.json")
triton_dir = work / "triton"
triton_json = {str(p.relative_to(triton_dir)): load(p) for p in sorted(triton_dir.rglob("*.json"))} if triton_dir.is_dir() else {}
triton_mds = sorted(triton_dir.rglob("*.md")) if triton_dir.is_dir() else []
tables = {
    "features.md": step_md("features", [work / "features" / "features.md"], "gpu_features.py"),
    "p2p.md": step_md("p2p", [work / "p2p" / "p2p_profile.md", work / "p2p" / "flux" / "p2p_profile.md"], "gpu_p2p_profile.py"),
    # (--part all writes attention.md; the MM-DiT check's --part unet only attention-unet.md)
    "attention.md": step_md("attention", [work / "attention" / ("attention.md" if (work / "attention" / "attention.md").exists()
                                                                  else "attention-unet.md")], "attention.py"),
    "triton.md": step_md("taps", triton_mds, "triton_taps.py") if (root / "benchmarks" / "triton_taps.py").exists()
    else "_triton_taps.py: not in this tree, not run._\n",
}
for name, text in tables.items():
    (out / name).write_text(text, encoding="utf-8")

# summary.md
rows = "\n".join(f"| {s['step']} | {s['status']} | {s['seconds']} | {s['limit_s']} |" for s in steps)
c = tests.get("counts", {})
fails = [r for r in features.get("features", []) if r.get("status") == "FAIL"]
head = [
    f"# attnctrl GPU check{' (CPU rehearsal, tiny models: no GPU figures)' if quick else ''}",
    "",
    f"- GPU: {env.get('gpu', 'none')} (capability {env.get('capability', '—')}, {env.get('gpu_mem_gb', '—')} GB, "
    f"{env.get('sm_count', '—')} SMs); device used: {device}",
    f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
    f"diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, xformers: {env.get('xformers')}",
    f"- attnctrl {env.get('attnctrl')} from {env.get('attnctrl_file')}",
    f"- kernel backends: {', '.join(f'{k}: {v}' for k, v in (env.get('backends') or {}).items())}",
    "",
    "| step | status | seconds | limit (s) |",
    "|---|---|---|---|",
    rows,
    "",
    f"**Tests**: {c.get('tests', '?')} run, {c.get('failures', '?')} failed, {c.get('errors', '?')} errors, "
    f"{c.get('skipped', '?')} skipped ({c.get('seconds', '?')} s)" + (f"; {tests['error']}" if tests.get("error") else "") + ".",
]
head += [f"- {f['kind'].upper()} {f['test']}: {f['message']}" for f in tests["failures"][:40]]
counts = features.get("counts", {})
head += ["", f"**Features**: FAIL count {features.get('fail_count', '?')} "
         f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'no result'})"
         + ("" if features.get("complete", False) else " — partial run") + "."]
head += [f"- FAIL {r['group']}/{r['dtype']} {r['feature']}: {r['note'][:200]}" for r in fails[:60]]
if p2p:
    verdicts = []
    for size, d in (p2p.get("sizes") or {}).items():
        v = d.get("variants") or {}
        plain, fused = v.get("plain", {}), v.get("fused", {})
        if plain.get("status") == "ok" and fused.get("status") == "ok":
            t = fused["seconds"] / plain["seconds"]
            m = fused["peak_gb"] / plain["peak_gb"] if plain.get("peak_gb") else float("nan")
            verdicts.append(f"{size}²: fused {t:.2f}× time, {m:.2f}× memory")
        else:
            verdicts.append(f"{size}²: fused {fused.get('status', 'not run')}")
    head += ["", f"**P2P**: {'; '.join(verdicts) or 'no size finished'} (targets ≤ 1.05× time, ≤ 1.10× memory)."]
summary = "\n".join(head) + "\n\n---\n\n## Features\n\n" + tables["features.md"] + "\n---\n\n## Prompt-to-Prompt\n\n" \
    + tables["p2p.md"] + "\n---\n\n## Efficient attention\n\n" + tables["attention.md"] + "\n---\n\n## Triton taps\n\n" \
    + tables["triton.md"]
(out / "summary.md").write_text(summary, encoding="utf-8")

everything = {"quick_rehearsal": quick, "device": device, "environment": env, "env_text": read(work / "env.txt"),
              "steps": steps, "tests": tests, "features": features, "p2p": p2p, "attention": attention,
              "triton_taps": triton_json, "wheels_manifest": read(root / ".whl" / "MANIFEST.txt")}
(out / "all.json").write_text(json.dumps(everything, indent=1, default=str) + "\n", encoding="utf-8")
print("\n".join(head))
PYEOF

# log.txt: this script's log, then the end of every step's own log
for f in env tests features p2p attention taps; do
    for path in "$WORK/$f.log" "$WORK/$f.txt"; do
        [ -f "$path" ] || continue
        { echo; echo "===== $(basename "$path") (last 400 lines) ====="; tail -n 400 "$path"; } >> "$LOG"
    done
done
log "done in $(($(date +%s) - T0))s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$WORK"
exit 0
