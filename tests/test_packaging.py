"""The wheel holds one package, ``attnctrl`` (with the mapped sibling folders and the shapes model),
and ``import attnctrl`` stays light."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "triton", "xformers", "gradio")


def _copy_source(dest: Path) -> Path:
    """The checkout without build outputs, run folders and VCS data (so the build never writes
    into the working tree)."""
    ignore = shutil.ignore_patterns(
        ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "*.tmp", "out", "artifacts",
        "attnctrl-demo",
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _build_isolation_flags() -> list[str]:
    # Offline machines cannot fetch the build backend; when a recent setuptools is installed here,
    # build with it instead of a freshly downloaded one.
    try:
        import setuptools

        major = int(setuptools.__version__.split(".")[0])
    except Exception:
        return []
    return ["--no-build-isolation"] if major >= 70 else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_source(tmp / "src")
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(out), *_build_isolation_flags()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    wheels = list(out.glob("attnctrl-*.whl"))
    assert len(wheels) == 1, os.listdir(out)
    with zipfile.ZipFile(wheels[0]) as zf:
        names = zf.namelist()
        entry = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = zf.read(entry[0]).decode("utf-8") if entry else ""
    return {"names": names, "entry_points": entry_points}


@pytest.mark.timeout(600)
def test_wheel_contents(wheel):
    names = set(wheel["names"])
    for required in (
        "attnctrl/__init__.py",
        "attnctrl/cli/__init__.py",
        "attnctrl/cli/options.py",
        "attnctrl/__main__.py",
        "attnctrl/viz.py",
        "attnctrl/io.py",
        "attnctrl/kernels/__init__.py",
        "attnctrl/processors/__init__.py",
        "attnctrl/pipelines/__init__.py",
        "attnctrl/app/__init__.py",
        "attnctrl/models/__init__.py",
        "attnctrl/models/shapes/model/model_index.json",
    ):
        assert required in names, f"{required} missing from the wheel"
    # Every Python module of the source tree is in the wheel, at its package path.
    sources = {"attnctrl": ROOT / "attnctrl", "attnctrl/processors": ROOT / "processors",
               "attnctrl/pipelines": ROOT / "pipelines", "attnctrl/app": ROOT / "app"}
    for prefix, folder in sources.items():
        for py in folder.rglob("*.py"):
            if "__pycache__" in py.parts:
                continue
            wheel_path = f"{prefix}/{py.relative_to(folder).as_posix()}"
            assert wheel_path in names, f"{wheel_path} missing from the wheel (is its package listed in pyproject?)"
    model_files = [n for n in names if n.startswith("attnctrl/models/shapes/model/")]
    assert any(n.endswith(".safetensors") for n in model_files), model_files
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert any(n.startswith(f"attnctrl/models/shapes/model/{component}/") for n in model_files), component
    top_level = {n.split("/", 1)[0] for n in names if "/" in n}
    for forbidden in ("processors", "pipelines", "app", "tests", "scripts", "benchmarks"):
        assert forbidden not in top_level, f"top-level {forbidden}/ in the wheel"


@pytest.mark.timeout(600)
def test_wheel_console_script(wheel):
    lines = [line.replace(" ", "") for line in str(wheel["entry_points"]).splitlines()]
    assert "[console_scripts]" in lines
    assert "attnctrl=attnctrl.cli:main" in lines


@pytest.mark.parametrize("module", ["attnctrl", "attnctrl.cli", "attnctrl.viz", "attnctrl.io", "attnctrl.models"])
def test_import_is_light(module):
    code = (
        f"import sys, {module}; "
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(ROOT.parent))
    assert res.returncode == 0, f"import {module} pulled in {res.stdout.strip()} {res.stderr[-2000:]}"


def test_installed_package_is_used():
    """Tests run against the installed package (editable or not), not a stray copy."""
    spec = importlib.util.find_spec("attnctrl.pipelines")
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).name == "__init__.py"


def test_ci_runs_the_readme_test_command():
    """.ci/run executes exactly the README's "run the tests" line, piece by piece."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in readme.splitlines() if "python -m pytest" in line and "&&" in line]
    assert len(lines) == 1, lines
    parts = [p.strip() for p in lines[0].split("&&")]
    ci_commands = [line.strip() for line in ci.splitlines() if not line.strip().startswith("#")]
    for part in parts:
        assert any(line == part or line.endswith(" " + part) for line in ci_commands), part
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
