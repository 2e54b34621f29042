"""Every public attnctrl feature, end to end, on a GPU in fp16 and bf16: does it run, how long, is it finite.

What it runs
------------
Per model family and dtype (``--families sd15 sdxl``, ``--dtypes fp16 bf16``), on one pipeline of
random weights built from the published configs (SD 1.5's UNet from ``benchmarks/p2p.py``, SDXL
base's from ``_common.SDXL_UNET``), with small random CLIP text encoders of the real widths (768;
768 + 1280 with projection for SDXL), a tiny 4-level VAE (scale factor 8, as SD's) and a real
``CLIPTokenizer`` over a vocabulary written offline: 512² images, 3 denoising steps (2 for the
inversions, the consistency pipeline and the policies), DDIM, guidance 7.5. Features, each timed:

* Prompt2PromptPipeline / Prompt2PromptXLPipeline: Replace + LocalBlend, Refine + LocalBlend
  (subtract), Reweight chained over Replace, the attention store's word maps, materialise=True at
  256²;
* ``attnctrl.control`` on the stock pipeline (LocalBlend through ``callback_on_step_end``);
* ``attnctrl.pipelines.invert`` with every method (ddim, null-text, negative-prompt, direct, dpl),
  each followed by an edit from the inversion;
* ConsistentSubjectsPipeline / ConsistentSubjectsXLPipeline, and the presets
  ``consistent_self_attention`` and ``subject_shared_attention`` on the stock pipeline;
* every efficient-attention policy (AgentAttention, WindowAttention, ProxyAttention,
  GroupedAttention via ``attnctrl.apply``) alone and under Prompt-to-Prompt;
* one Prompt-to-Prompt edit with each kernel backend forced (sdpa, flex, triton, xformers) where it
  is available here; a backend that refuses some call of the edit by its declared capabilities
  (e.g. flex runs group routings only) is reported as ``refused``, not as a failure;
* the command line on the embedded shapes model, per dtype: ``attnctrl edit``, ``attnctrl invert``
  then ``attnctrl edit --inversion``, ``attnctrl batch`` (generate, edit, invert-and-edit,
  consistent jobs), in process through ``attnctrl.cli.main``; plus one ``python -m attnctrl edit``
  subprocess (first dtype only) for the entry point itself.

Each feature: ``ok`` / ``FAIL`` (exception type and the first line of its message) / ``refused`` /
``unsupported`` (the package's documented ``UnsupportedModelError``, e.g. DPL on SDXL) / ``skipped``, seconds (synchronised; the first feature of a pipeline includes CUDA's one-off costs:
cuBLAS/cuDNN heuristics, Triton and ``torch.compile`` builds), peak GPU memory (CUDA), and a
finiteness check of what it produced (latents, maps, inversion latents; decoded images must not be
blank, which is what NaN latents decode to). The slow features (forced Triton, DPL, the CLI
subprocess) run in a second pass after all the others, the pipelines staying built in between.
``--budget`` seconds: features not started by then are ``skipped (time budget)``; results are written after every feature, so a run stopped from outside
keeps what it finished. The exit code is 0 whatever failed (the FAIL count is printed last); 2 only
for bad arguments.

How to run
----------
::

    python benchmarks/gpu_features.py                          # CUDA: sd15+sdxl x fp16+bf16 + CLI
    python benchmarks/gpu_features.py --budget 80 --out DIR   # as benchmarks/gpu_check.sh runs it
    python benchmarks/gpu_features.py --device cpu --quick    # smoke test: tiny configs of tests/conftest.py, 32²

``--quick`` uses the tiny SD/SDXL pipelines of ``tests/conftest.py`` (``build_sd``/``build_sdxl``) at
their native 32² instead of the published configs. Results: ``features.md`` and ``features.json`` in
``--out`` (default ``benchmarks/results/gpu`` on CUDA; on CPU nothing is written unless ``--out`` is
given); the table is also printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    SDXL_UNET,
    atomic_write,
    environment,
    markdown_table,
    resolve_device,
    synchronize,
)

RESULTS = HERE / "results" / "gpu"
SEED = 0
GUIDANCE = 7.5
PROMPTS = ["a photo of a cat on the grass", "a photo of a dog on the grass"]
REFINE = ["a cat on the grass", "a big red cat on the grass"]
STORY = ["a cat on the grass", "a cat on the beach"]
# Every word the prompts use is one token (all are in tests/conftest.py's WHOLE_WORDS too).
WORDS = sorted({w for p in PROMPTS + REFINE + STORY + ["a red cat", "a blue dog", "a cat and a dog"] for w in p.split()})
TEXT_MAX_LENGTH = 77
METHODS = ("ddim", "null-text", "negative-prompt", "direct", "dpl", "edit-friendly")
BACKENDS = ("sdpa", "flex", "triton", "xformers")
SHAPES_SOURCE = "a red circle on the left"
SHAPES_EDITED = "a blue circle on the left"
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


class Refused(Exception):
    """A forced kernel backend declined a call of the edit by its declared capabilities."""


class Blank(Exception):
    """Not an error of the feature: raised by checks to say what was not finite."""


# ---- models --------------------------------------------------------------------------------------
def _tokenizer(folder: Path, max_length: int) -> Any:
    from transformers import CLIPTokenizer

    from p2p import write_clip_vocab  # benchmarks/p2p.py: a CLIP BPE vocabulary written offline

    vocab, merges = write_clip_vocab(folder, WORDS)
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length)


def _text_encoder(tokenizer: Any, hidden: int, heads: int, projection: int | None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=TEXT_MAX_LENGTH, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=projection or hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Four levels so that vae_scale_factor is SD's 8; 8 channels: the decode costs next to nothing.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    )


def build_full(family: str, device: str, dtype: Any, folder: Path) -> Any:
    """An SD 1.5- or SDXL-shaped Prompt2Prompt pipeline: the published UNet config, random weights,
    built directly on ``device`` (initialising 2.6 B parameters on the CPU would take longer than the
    features)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from attnctrl.pipelines import Prompt2PromptPipeline, Prompt2PromptXLPipeline
    from p2p import SD15_SCHEDULER, SD15_UNET

    tokenizer = _tokenizer(folder, TEXT_MAX_LENGTH)
    torch.manual_seed(SEED)
    with torch.device(device):
        vae = _vae()
        if family == "sd15":
            unet = UNet2DConditionModel(**SD15_UNET).eval()
            text_encoder = _text_encoder(tokenizer, 768, 12, None)
            pipe = Prompt2PromptPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            unet = UNet2DConditionModel(**SDXL_UNET).eval()
            text_encoder = _text_encoder(tokenizer, 768, 12, None)
            text_encoder_2 = _text_encoder(tokenizer, 1280, 20, 1280)
            pipe = Prompt2PromptXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD15_SCHEDULER),
                force_zeros_for_empty_prompt=True,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def build_quick(family: str, device: str, dtype: Any, folder: Path) -> Any:
    """The tiny pipelines of tests/conftest.py (32² images, 16² latents)."""
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import MAX_LENGTH, build_sd, build_sdxl, write_tokenizer

    write_tokenizer(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_LENGTH)
    pipe = (build_sd if family == "sd15" else build_sdxl)(tokenizer)
    return pipe.to(device=device, dtype=dtype)


# ---- checks ----------------------------------------------------------------------------------------
def _finite(t: Any, what: str) -> str:
    import torch

    if not torch.is_tensor(t):
        raise Blank(f"{what}: expected a tensor, got {type(t).__name__}")
    if not bool(torch.isfinite(t).all()):
        raise Blank(f"{what}: {int((~torch.isfinite(t)).sum())} non-finite values of {t.numel()}")
    return f"{what} {tuple(t.shape)} finite"


def _not_blank(images: Any, what: str) -> str:
    """PIL images (or a list): NaN latents decode to all-black images; a random VAE draws noise."""
    import numpy as np

    images = images if isinstance(images, (list, tuple)) else [images]
    for i, im in enumerate(images):
        a = np.asarray(im, dtype=np.float32)
        if a.size == 0 or float(a.std()) == 0.0:
            raise Blank(f"{what}[{i}] is blank (constant {float(a.flat[0]) if a.size else 'empty'}): NaN/inf latents?")
    return f"{len(images)} {what} not blank"


def _png_not_blank(folder: Path) -> str:
    from PIL import Image

    pngs = sorted(folder.rglob("*.png"))
    if not pngs:
        raise Blank(f"no PNG written under {folder.name}/")
    return _not_blank([Image.open(p).convert("RGB") for p in pngs[:8]], f"PNGs (of {len(pngs)})")


# ---- the features ----------------------------------------------------------------------------------
class Suite:
    """The features of one (family, dtype) pipeline."""

    def __init__(self, pipe: Any, family: str, size: int, small: int, steps: int, few: int) -> None:
        self.pipe, self.family, self.size, self.small, self.steps, self.few = pipe, family, size, small, steps, few
        self.last_p2p: Any = None

    def gen(self) -> Any:
        import torch

        return torch.Generator("cpu").manual_seed(SEED)

    def common(self, steps: int | None = None, size: int | None = None) -> dict[str, Any]:
        s = size or self.size
        return dict(num_inference_steps=steps or self.steps, height=s, width=s, output_type="latent", generator=self.gen())

    def stock(self) -> Any:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls = StableDiffusionPipeline if self.family == "sd15" else StableDiffusionXLPipeline
        stock = cls.from_pipe(self.pipe)
        stock.set_progress_bar_config(disable=True)
        return stock

    def shared_latents(self, rows: int, size: int | None = None) -> Any:
        import torch

        s = (size or self.size) // self.pipe.vae_scale_factor
        noise = torch.randn((1, 4, s, s), generator=self.gen())
        return noise.repeat(rows, 1, 1, 1).to(self.pipe.device, self.pipe.unet.dtype)

    def image(self) -> Any:
        from PIL import Image, ImageDraw

        s = self.size
        im = Image.new("RGB", (s, s), (120, 160, 90))
        ImageDraw.Draw(im).ellipse((s // 5, s // 3, s // 2, 2 * s // 3), fill=(200, 120, 40))
        return im

    # each returns a short "what was checked" note; raising means FAIL (Blank: not finite)
    def p2p_replace_blend(self) -> str:
        import attnctrl

        out = self.pipe(PROMPTS, edit=attnctrl.Replace(blend=attnctrl.LocalBlend(("cat", "dog"))), **self.common())
        self.last_p2p = out
        return _finite(out.images, "latents")

    def word_maps(self) -> str:
        if self.last_p2p is None or self.last_p2p.attention is None:
            raise RuntimeError("no attention store from the Replace + LocalBlend run (it failed or was skipped)")
        maps = self.last_p2p.attention.word_maps(1, "dog")
        return _finite(maps, "word map 'dog'")

    def p2p_refine_blend(self) -> str:
        import attnctrl

        edit = attnctrl.Refine(blend=attnctrl.LocalBlend(("cat", "cat"), subtract=("grass",)))
        return _finite(self.pipe(REFINE, edit=edit, **self.common()).images, "latents")

    def p2p_reweight_chained(self) -> str:
        import attnctrl

        edit = attnctrl.Reweight({"dog": -1.0, "grass": 2.0}, base=attnctrl.Replace())
        return _finite(self.pipe(PROMPTS, edit=edit, **self.common()).images, "latents")

    def p2p_materialise(self) -> str:
        import attnctrl

        out = self.pipe(PROMPTS, edit=attnctrl.Replace(blend=attnctrl.LocalBlend(("cat", "dog"))), materialise=True,
                        **self.common(size=self.small))
        return _finite(out.images, f"latents at {self.small}²")

    def control_stock(self) -> str:
        import attnctrl

        stock = self.stock()
        edit = attnctrl.Replace(blend=attnctrl.LocalBlend(("cat", "dog")))
        with attnctrl.control(stock, edit, PROMPTS) as session:
            out = stock(PROMPTS, latents=self.shared_latents(len(PROMPTS)), callback_on_step_end=session.step_end,
                        callback_on_step_end_tensor_inputs=["latents"], **self.common())
            maps = session.attention.word_maps(1, "dog")
        return _finite(out.images, "latents") + "; " + _finite(maps, "map")

    def invert_then_edit(self, method: str) -> str:
        import attnctrl
        from attnctrl.pipelines import invert

        inv = invert(self.pipe, self.image(), REFINE[0], method=method, num_inference_steps=self.few, inner_steps=2,
                     height=self.size, width=self.size, words=["cat"] if method == "dpl" else None, progress=False)
        note = _finite(inv.latents, "inversion latents")
        out = self.pipe([REFINE[0], "a dog on the grass"], edit=attnctrl.Replace(), inversion=inv, output_type="latent")
        return note + "; " + _finite(out.images, "edit latents")

    def consistent_pipeline(self) -> str:
        from attnctrl.pipelines.consistency import ConsistentSubjectsPipeline, ConsistentSubjectsXLPipeline, Subject

        cls = ConsistentSubjectsPipeline if self.family == "sd15" else ConsistentSubjectsXLPipeline
        pipe = cls.from_pipe(self.pipe)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(subjects=[Subject("a", "a red cat", "cat"), Subject("b", "a blue dog", "dog")], scenes=["a cat and a dog"],
                   num_inference_steps=self.few, height=self.size, width=self.size, generator=self.gen())
        if len(out.scenes) != 1:
            raise RuntimeError(f"expected 1 scene, got {len(out.scenes)}")
        return _not_blank(list(out.references) + list(out.scenes), "references+scenes")

    def preset_consistent_self_attention(self) -> str:
        from attnctrl.consistency import ConsistentSelfAttention
        from attnctrl.pipelines.consistency import consistent_self_attention

        stock = self.stock()
        with consistent_self_attention(stock, ConsistentSelfAttention()):
            out = stock(STORY, **self.common(steps=self.few))
        return _finite(out.images, "latents")

    def preset_subject_shared_attention(self) -> str:
        from attnctrl.consistency import ConsiStory
        from attnctrl.pipelines.consistency import subject_shared_attention

        stock = self.stock()
        with subject_shared_attention(stock, ConsiStory(start_step=1), "cat", prompts=STORY):
            out = stock(STORY, **self.common())
        return _finite(out.images, "latents")

    def policy(self, name: str, under_p2p: bool) -> str:
        import attnctrl

        config = {"agent": attnctrl.AgentAttention, "window": attnctrl.WindowAttention,
                  "proxy": attnctrl.ProxyAttention, "grouped": attnctrl.GroupedAttention}[name]()
        with attnctrl.apply(self.pipe, config):
            if under_p2p:
                out = self.pipe(PROMPTS, edit=attnctrl.Replace(blend=attnctrl.LocalBlend(("cat", "dog"))),
                                **self.common(steps=self.few))
            else:
                out = self.pipe(REFINE[0], **self.common(steps=self.few))
        return _finite(out.images, "latents")

    def forced_backend(self, name: str) -> str:
        import attnctrl
        from attnctrl.kernels import NoBackendError, get_backend

        reason = get_backend(name).availability()
        if reason is not None:
            raise _Skip(f"not available here: {reason}")
        try:
            out = self.pipe(PROMPTS, edit=attnctrl.Replace(blend=attnctrl.LocalBlend(("cat", "dog"))), backend=name,
                            **self.common())
        except NoBackendError as err:
            raise Refused(_first_line(err)) from err
        return _finite(out.images, "latents")

    def features(self) -> list[tuple[str, Callable[[], str]]]:
        feats: list[tuple[str, Callable[[], str]]] = [
            ("p2p Replace + LocalBlend", self.p2p_replace_blend),
            ("attention store word_maps", self.word_maps),
            ("p2p Refine + LocalBlend(subtract)", self.p2p_refine_blend),
            ("p2p Reweight chained over Replace", self.p2p_reweight_chained),
            (f"p2p materialise=True ({self.small}²)", self.p2p_materialise),
            ("attnctrl.control on the stock pipeline", self.control_stock),
        ]
        feats += [(f"invert {m} -> edit", (lambda m=m: self.invert_then_edit(m))) for m in METHODS]
        feats += [
            ("ConsistentSubjects" + ("" if self.family == "sd15" else "XL") + "Pipeline", self.consistent_pipeline),
            ("preset consistent_self_attention (stock)", self.preset_consistent_self_attention),
            ("preset subject_shared_attention (stock)", self.preset_subject_shared_attention),
        ]
        for name in ("agent", "window", "proxy", "grouped"):
            feats.append((f"policy {name} alone", (lambda n=name: self.policy(n, False))))
            feats.append((f"policy {name} under p2p", (lambda n=name: self.policy(n, True))))
        feats += [(f"forced backend {b} (p2p edit)", (lambda b=b: self.forced_backend(b))) for b in BACKENDS]
        return feats


class _Skip(Exception):
    pass


HEAVY = ("forced backend triton", "invert dpl", "cli subprocess")


def is_heavy(name: str) -> bool:
    """Features run in the second pass (slow: builds, tuning, a fresh interpreter)."""
    return name.startswith(HEAVY)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:300]


# ---- the command line --------------------------------------------------------------------------------
def cli_features(device: str, dtype: str, steps: int, work: Path, with_subprocess: bool) -> list[tuple[str, Callable[[], str]]]:
    """``attnctrl edit``/``invert``/``batch`` on the embedded shapes model (64² images)."""
    from PIL import Image, ImageDraw

    work.mkdir(parents=True, exist_ok=True)
    image = work / "circle.png"
    im = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(im).ellipse((6, 20, 28, 42), fill=(220, 30, 30))
    im.save(image)
    inv_file = work / "circle.safetensors"
    common = ["--device", device, "--dtype", dtype]

    def run(argv: list[str]) -> str:
        from attnctrl import cli

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = cli.main(argv)
        if code != 0:
            raise RuntimeError(f"exit code {code}: {buf.getvalue().strip()[-300:]}")
        return buf.getvalue()

    def edit() -> str:
        out = work / "edit"
        run(["edit", "--prompt", SHAPES_SOURCE, "--to", SHAPES_EDITED, "--blend", "circle", "--steps", str(steps),
             *common, "--out", str(out)])
        return _png_not_blank(out)

    def invert_edit() -> str:
        run(["invert", str(image), "--prompt", SHAPES_SOURCE, "--method", "null-text", "--inner-steps", "2",
             "--steps", str(steps), *common, "-o", str(inv_file)])
        out = work / "edit-inversion"
        run(["edit", "--inversion", str(inv_file), "--prompt", SHAPES_SOURCE, "--to", SHAPES_EDITED, *common,
             "--out", str(out)])
        return "inversion written; " + _png_not_blank(out)

    def batch() -> str:
        jobs = [
            {"id": "gen", "kind": "generate", "prompt": SHAPES_SOURCE, "steps": steps, "efficient": "agent"},
            {"id": "swap", "kind": "edit", "prompt": SHAPES_SOURCE, "to": [SHAPES_EDITED], "blend": ["circle"],
             "weights": {"blue": 2.0}, "steps": steps},
            {"id": "real", "kind": "invert-and-edit", "image": image.name, "method": "ddim", "prompt": SHAPES_SOURCE,
             "to": SHAPES_EDITED, "steps": steps},
            {"id": "pals", "kind": "consistent", "subjects": [{"name": "c", "prompt": "a red circle", "word": "circle"}],
             "scenes": ["a red circle at the top", "a red circle on the left"], "steps": steps},
        ]
        path = work / "jobs.jsonl"
        path.write_text("".join(json.dumps(j) + "\n" for j in jobs), encoding="utf-8")
        out = work / "batch"
        try:
            run(["batch", str(path), "--out", str(out), *common, "--no-progress"])
        except RuntimeError:
            pass  # exit code 1 when a job failed: the records below say which
        records = [json.loads(x) for x in (out / "results.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
        bad = [f"{r.get('id')}: {r.get('status')} {str(r.get('error') or '')[:120]}" for r in records if r.get("status") != "ok"]
        if bad or len(records) != len(jobs):
            raise RuntimeError(f"{len(records)} records for {len(jobs)} jobs; not ok: {'; '.join(bad)}")
        return f"{len(records)} jobs ok; " + _png_not_blank(out)

    def subprocess_edit() -> str:
        out = work / "edit-subprocess"
        # From a scratch folder: the repository root would shadow the installed package (attnctrl/
        # there lacks the mapped processors/pipelines folders).
        proc = subprocess.run(
            [sys.executable, "-m", "attnctrl", "edit", "--prompt", SHAPES_SOURCE, "--to", SHAPES_EDITED,
             "--steps", str(steps), *common, "--out", str(out)],
            cwd=str(work), capture_output=True, text=True, timeout=300,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"exit code {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
        return _png_not_blank(out)

    feats = [("cli edit", edit), ("cli invert -> edit --inversion", invert_edit), ("cli batch (4 kinds)", batch)]
    if with_subprocess:
        feats.append(("cli subprocess: python -m attnctrl edit", subprocess_edit))
    return feats


# ---- the runner ------------------------------------------------------------------------------------
class Runner:
    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.env: dict[str, Any] = {}
        self.order: dict[tuple[str, str], int] = {}  # table order of the (model, dtype) groups

    def out_of_time(self) -> bool:
        return self.args.budget is not None and time.perf_counter() - self.started > self.args.budget

    def record(self, group: str, dtype: str, feature: str, status: str, seconds: float | None, note: str,
               peak: int | None = None) -> None:
        self.order.setdefault((group, dtype), len(self.order))
        row = {"group": group, "dtype": dtype, "feature": feature, "status": status, "seconds": seconds,
               "peak_gb": None if peak is None else peak / 1e9, "note": note}
        self.rows.append(row)
        secs = "" if seconds is None else f"{seconds:7.2f} s"
        print(f"[{group}/{dtype}] {status:8s} {secs:>10s}  {feature}: {note[:160]}", file=sys.stderr, flush=True)
        self.write(complete=False)

    def run_one(self, group: str, dtype: str, name: str, fn: Callable[[], str]) -> None:
        import torch

        from attnctrl.errors import UnsupportedModelError

        if self.out_of_time():
            self.record(group, dtype, name, "skipped", None, f"time budget ({self.args.budget:g} s) spent")
            return
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        status, note = "ok", ""
        try:
            note = fn()
        except _Skip as err:
            status, note = "skipped", str(err)
        except Refused as err:
            status, note = "refused", str(err)
        except Blank as err:
            status, note = "FAIL", f"not finite: {err}"
        except UnsupportedModelError as err:
            status, note = "unsupported", f"{type(err).__name__}: {_first_line(err)}"
        except Exception as err:  # noqa: BLE001 - every failure is a row of the table
            status, note = "FAIL", f"{type(err).__name__}: {_first_line(err)}"
            if self.args.verbose:
                traceback.print_exc()
            else:
                tb = traceback.extract_tb(err.__traceback__)
                where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "attnctrl" in f.filename
                              or "/processors/" in f.filename or "/pipelines/" in f.filename), "")
                if where:
                    note += f" (at {where})"
        try:
            synchronize(self.device)
        except Exception as err:  # noqa: BLE001 - a CUDA error surfaces at the sync
            status, note = "FAIL", f"{type(err).__name__} at synchronize: {_first_line(err)}"
        seconds = time.perf_counter() - t0
        peak = int(torch.cuda.max_memory_allocated()) if cuda else None
        self.record(group, dtype, name, status, seconds if status != "skipped" else None, note, peak)

    def run(self) -> None:
        import torch

        args = self.args
        self.env = environment(self.device)
        for name in ("diffusers", "triton"):
            try:
                self.env[name] = importlib.import_module(name).__version__
            except ImportError:
                self.env[name] = "not installed"
        from attnctrl.kernels import available_backends

        self.env["attnctrl_backends_available"] = available_backends()
        size = args.size or (32 if args.quick else 512)
        small = args.small or (32 if args.quick else 256)
        build = build_quick if args.quick else build_full
        groups: list[tuple[str, str]] = []
        for dtype in args.dtypes:
            groups += [(family, dtype) for family in args.families]
            if args.cli:
                groups.append(("cli", dtype))
        # Two passes: everything but the slow features for every (model, dtype) first, so a time
        # budget cuts the slow ones (forced Triton: kernel builds and tuning per shape; DPL; a fresh
        # interpreter for the CLI subprocess) rather than whole dtypes. Pipelines stay built between
        # the passes (SD 1.5 + SDXL in fp16 and bf16: ~14 GB on a GPU) and are released at the end.
        suites: dict[tuple[str, str], Suite | None] = {}
        with tempfile.TemporaryDirectory(prefix="attnctrl-gpu-") as tmp:
            for heavy in (False, True):
                for group, dtype in groups:
                    if group == "cli":
                        feats = cli_features(self.device, dtype, args.steps, Path(tmp) / f"cli-{dtype}",
                                             with_subprocess=dtype == args.dtypes[0])
                        label = "cli (shapes model)"
                    else:
                        if (group, dtype) not in suites:
                            suites[(group, dtype)] = self.build_suite(group, dtype, build, size, small, Path(tmp) / f"tok-{group}-{dtype}")
                        suite = suites[(group, dtype)]
                        if suite is None:
                            continue
                        feats, label = suite.features(), group
                    for name, fn in feats:
                        if is_heavy(name) == heavy and (not args.only or any(o in name for o in args.only)):
                            self.run_one(label, dtype, name, fn)
            suites.clear()
            gc.collect()
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        self.rows.sort(key=lambda r: self.order.get((r["group"], r["dtype"]), 99))
        self.write(complete=True)

    def build_suite(self, family: str, dtype: str, build: Any, size: int, small: int, folder: Path) -> Suite | None:
        """Build one pipeline (a row of its own); None when that failed."""
        import torch

        holder: dict[str, Any] = {}
        self.order.setdefault((family, dtype), len(self.order))

        def make() -> str:
            holder["pipe"] = build(family, self.device, getattr(torch, DTYPE_NAMES[dtype]), folder)
            unet = holder["pipe"].unet
            return f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M UNet parameters, {unet.dtype}"

        self.run_one(family, dtype, "build pipeline (random weights)", make)
        if "pipe" not in holder:
            return None
        return Suite(holder["pipe"], family, size, small, self.args.steps, self.args.few_steps)

    # ---- output --------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def markdown(self, complete: bool) -> str:
        a = self.args
        cuda = self.device.startswith("cuda")
        headers = ["model", "dtype", "feature", "status", "seconds"] + (["peak GB"] if cuda else []) + ["check / error"]
        rows = []
        for r in self.rows:
            row = [r["group"], r["dtype"], r["feature"], r["status"] if r["status"] != "FAIL" else "**FAIL**",
                   "—" if r["seconds"] is None else f"{r['seconds']:.2f}"]
            if cuda:
                row.append("—" if r["peak_gb"] is None else f"{r['peak_gb']:.1f}")
            row.append(str(r["note"]).replace("|", "\\|").replace("\n", " ")[:240])
            rows.append(row)
        counts = self.counts()
        env = self.env
        machine = env.get("gpu") or env.get("cpu", "")
        head = (
            f"## attnctrl features on {self.device} ({machine})\n\n"
            f"{'Tiny configs of tests/conftest.py' if a.quick else 'Published SD 1.5 / SDXL UNet configs, random weights'}, "
            f"{a.size or (32 if a.quick else 512)}² images, {a.steps} steps ({a.few_steps} for inversions, consistency, "
            f"policies); CLI on the embedded shapes model. torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
            f"triton {env.get('triton', '—')}; backends available: {', '.join(env.get('attnctrl_backends_available', []))}.\n\n"
            f"Seconds are wall time with the device synchronised; the first feature of each pipeline carries the "
            f"one-off CUDA costs. refused = a forced backend declined a call by its declared capabilities; unsupported = the "
            f"package's documented UnsupportedModelError for this model (e.g. DPL on SDXL). Slow features (forced "
            f"Triton, DPL, the CLI subprocess) run in a second pass after all the others.\n"
        )
        tail = (f"\nTotals: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}. "
                f"FAIL count: {counts.get('FAIL', 0)}. Wall time {time.perf_counter() - self.started:.0f} s"
                + ("" if complete else " (partial: the run is going on or was stopped)") + ".\n")
        return head + "\n" + markdown_table(headers, rows) + "\n" + tail

    def write(self, complete: bool) -> None:
        if self.args.out is None:
            return
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "features.md", self.markdown(complete))
        data = {"command": sys.argv[1:], "device": self.device, "complete": complete, "counts": self.counts(),
                "fail_count": self.counts().get("FAIL", 0), "elapsed_s": time.perf_counter() - self.started,
                "environment": self.env, "features": self.rows}
        atomic_write(out / "features.json", json.dumps(data, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cuda")
    p.add_argument("--dtypes", nargs="+", choices=("fp16", "bf16", "fp32"), default=["fp16", "bf16"])
    p.add_argument("--families", nargs="+", choices=("sd15", "sdxl"), default=["sd15", "sdxl"])
    p.add_argument("--quick", action="store_true", help="tiny configs of tests/conftest.py at 32² (smoke test)")
    p.add_argument("--size", type=int, default=None, help="image size (default 512; --quick 32)")
    p.add_argument("--small", type=int, default=None, help="image size of the materialised run (default 256; --quick 32)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps of the edits (default 3)")
    p.add_argument("--few-steps", type=int, default=2, help="steps of inversions, consistency, policies (default 2)")
    p.add_argument("--no-cli", dest="cli", action="store_false", help="skip the command-line features")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="only the features whose name contains one of these")
    p.add_argument("--budget", type=float, default=None, help="seconds; features not started by then are skipped")
    p.add_argument("--out", type=Path, default=None, help="folder for features.md / features.json "
                   "(default benchmarks/results/gpu on CUDA, nothing written on CPU)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of every failure")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = resolve_device(args.device)
    if args.out is None and device.startswith("cuda"):
        args.out = RESULTS
    runner = Runner(args, device)
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.write(complete=False)
        raise
    print(runner.markdown(complete=True))
    counts = runner.counts()
    print(f"FAIL count: {counts.get('FAIL', 0)} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    if args.out is not None:
        print(f"wrote {args.out / 'features.md'} and features.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
