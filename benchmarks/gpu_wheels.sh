#!/usr/bin/env bash
# Fill .whl/ (repository root, ignored by git) with the wheels the GPU check needs on the device
# machine, which has python 3.12, torch, triton, transformers, accelerate, safetensors and
# huggingface-hub but no diffusers and no internet (see benchmarks/results/gpu/README.md):
#
#   * diffusers==<the version installed here>, downloaded for CPython 3.12 / manylinux / any;
#   * every requirement of diffusers (and of those, recursively) that the device lacks, judged
#     against the device's package list (/work/.library/device/KINDS.md when present, else the copy
#     below), e.g. importlib_metadata; requirements the device has are checked against the versions
#     that list records, where it records one;
#   * attnctrl, built from the working tree (tracked + untracked-not-ignored files, copied to a
#     scratch folder so no build/ leftovers leak in), WITHOUT the shapes model's weights
#     (*.safetensors, 27 MB): the working tree travels to the device anyway, and
#     benchmarks/gpu_check.sh copies the tree's package files, weights included, over the installed
#     wheel. That also keeps the check on the current sources if the tree changed after this ran.
#
# Run here, from anywhere: `bash benchmarks/gpu_wheels.sh`. Needs pip and PyPI. Prints what it put in
# .whl/ and the size of what a device call will carry (limit 64 MiB; .whl/ aims at < 20 MB).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHL="$ROOT/.whl"
KINDS=${DEVICE_KINDS_MD:-/work/.library/device/KINDS.md}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # NAME==VERSION or NAME[SPEC]
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$WHL" "$1"
}

if ! git check-ignore -q .whl/x.whl 2>/dev/null; then
    echo "warning: .whl/ is not ignored by git here (add '/.whl/' to .gitignore); continuing" >&2
fi
rm -rf "$WHL"
mkdir -p "$WHL"

DIFFUSERS_VERSION=$("$PY" -c 'import diffusers; print(diffusers.__version__)')
echo "== diffusers==$DIFFUSERS_VERSION (the version installed here)"
download "diffusers==$DIFFUSERS_VERSION"

# Requirements of the carried wheels that the device lacks, recursively. The helper prints one
# requirement string per line to download, and notes on stderr.
missing_requirements() {
    "$PY" - "$WHL" "$KINDS" <<'PYEOF'
import re, sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

whl, kinds = Path(sys.argv[1]), Path(sys.argv[2])
# The device image's packages (KINDS.md, "Python packages already there", read 2026-11-17) and the
# versions a session's pip list showed there (2026-11), used when KINDS.md is not on this machine.
FALLBACK = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader
lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3
uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
            "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0", "triton": "3.6.0",
            "sentencepiece": "0.2.2", "tiktoken": "0.14.0", "torchvision": "0.26.0"}

present = {canonicalize_name(n) for n in FALLBACK}
source = "the copy in benchmarks/gpu_wheels.sh"
if kinds.exists():
    text = kinds.read_text(encoding="utf-8")
    m = re.search(r"nvidia-h200: their image.*?Packages: (.*?)\.\s*$", text, re.S | re.M)
    if m:
        present = {canonicalize_name(n.strip()) for n in m.group(1).split(",") if n.strip()}
        source = str(kinds)
    for name, version in re.findall(r"([A-Za-z0-9_.-]+) (\d+\.\d+(?:\.\d+)?(?:\.post\d+)?)(?=[,|])", text):
        VERSIONS.setdefault(str(canonicalize_name(name)), version)
VERSIONS = {canonicalize_name(k): v for k, v in VERSIONS.items()}
print(f"device package list: {source} ({len(present)} packages)", file=sys.stderr)

carried = {}
for w in whl.glob("*.whl"):
    carried[canonicalize_name(w.name.split("-")[0])] = w
wanted = []
for name, w in sorted(carried.items()):
    with zipfile.ZipFile(w) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode("utf-8").splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({"extra": "", "python_version": "3.12",
                                                               "python_full_version": "3.12.3", "sys_platform": "linux",
                                                               "platform_system": "Linux", "platform_machine": "x86_64",
                                                               "implementation_name": "cpython", "os_name": "posix"}):
            continue
        key = canonicalize_name(req.name)
        if key in carried:
            continue
        if key in present:
            v = VERSIONS.get(key)
            if v and req.specifier and not req.specifier.contains(Version(v), prereleases=True):
                print(f"WARNING: {name} needs {req}, the device has {req.name} {v}: carrying a matching wheel", file=sys.stderr)
                wanted.append(str(req))
            else:
                print(f"  {name} needs {req}: on the device{f' ({v})' if v else ''}", file=sys.stderr)
            continue
        print(f"  {name} needs {req}: NOT on the device -> carried", file=sys.stderr)
        wanted.append(str(req))
for r in dict.fromkeys(wanted):
    print(r)
PYEOF
}

# Recursively: download what is missing until nothing new is asked for.
for round in 1 2 3 4 5; do
    mapfile -t NEED < <(missing_requirements)
    [ "${#NEED[@]}" -eq 0 ] && break
    for req in "${NEED[@]}"; do
        name=$("$PY" -c 'import sys; from packaging.requirements import Requirement; print(Requirement(sys.argv[1]).name)' "$req")
        # The version installed here, when it satisfies the requirement (what the CPU runs use).
        here=$("$PY" - "$req" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
r = Requirement(sys.argv[1])
try:
    v = version(r.name)
    print(v if r.specifier.contains(v, prereleases=True) else "")
except PackageNotFoundError:
    print("")
PYEOF
)
        if [ -n "$here" ]; then
            echo "== $name==$here (installed here; required: $req)"
            download "$name==$here"
        else
            echo "== $req (latest matching; not installed here)"
            download "$req"
        fi
    done
done

echo "== attnctrl from the working tree"
SRC=$(mktemp -d /tmp/attnctrl-wheel-src-XXXXXX)
BUILD=$(mktemp -d /tmp/attnctrl-wheel-out-XXXXXX)
trap 'rm -rf "$SRC" "$BUILD"' EXIT
# Tracked and untracked-not-ignored files that exist (a deleted tracked file is skipped).
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    if [ -f "$f" ]; then mkdir -p "$SRC/$(dirname "$f")" && cp -p "$f" "$SRC/$f"; fi
done
"$PY" -m pip wheel -q --no-deps --no-build-isolation "$SRC" -w "$BUILD"
"$PY" - "$BUILD" "$WHL" <<'PYEOF'
"""Copy the attnctrl wheel without the shapes model's weights (RECORD rewritten to match)."""
import sys, zipfile
from pathlib import Path

build, whl = Path(sys.argv[1]), Path(sys.argv[2])
src = next(build.glob("attnctrl-*.whl"))
dst = whl / src.name
dropped = 0
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        name = info.filename
        if name.startswith("attnctrl/models/shapes/model/") and name.endswith(".safetensors"):
            dropped += info.file_size
            continue
        data = zin.read(name)
        if name.endswith(".dist-info/RECORD"):
            lines = [l for l in data.decode("utf-8").splitlines()
                     if not (l.startswith("attnctrl/models/shapes/model/") and ".safetensors," in l)]
            data = ("\n".join(lines) + "\n").encode("utf-8")
        zout.writestr(info, data)
print(f"  {dst.name}: shapes weights left out ({dropped / 1e6:.1f} MB; gpu_check.sh copies them from the tree)")
PYEOF

# What went in, and where it came from.
{
    echo "made by benchmarks/gpu_wheels.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) ($(uname -m), $("$PY" --version 2>&1))"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo '?') with $(git status --porcelain 2>/dev/null | wc -l) changed/untracked paths"
    for w in "$WHL"/*.whl; do echo "$(basename "$w") $(stat -c %s "$w")"; done
} > "$WHL/MANIFEST.txt"

echo
echo "== .whl/ now holds:"
ls -l "$WHL"
WHL_BYTES=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
TREE_BYTES=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | awk '$2=="total"{s+=$1} END{print s+0}')
echo "wheels: $((WHL_BYTES / 1000)) kB (aim: < 20 MB); working tree that travels: $((TREE_BYTES / 1000)) kB;"
echo "together $(((WHL_BYTES + TREE_BYTES) / 1048576)) MiB of the 64 MiB a device call may carry"
if [ $((WHL_BYTES + TREE_BYTES)) -gt $((64 * 1048576)) ]; then
    echo "ERROR: too large for one device call" >&2
    exit 1
fi
if [ "$WHL_BYTES" -gt 20000000 ]; then
    echo "warning: .whl/ is over 20 MB" >&2
fi
