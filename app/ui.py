"""The Gradio Blocks of the web UI (``attnctrl.app.build_app``).

Tabs: Edit, Attention maps, Real image, Consistent subjects. The handlers parse the form
(:mod:`attnctrl.app.options`), get the model from the cache (:mod:`attnctrl.app.models`) and call
:mod:`attnctrl.app.actions`, which call :mod:`attnctrl.pipelines`. A user error becomes a
``gr.Error`` with attnctrl's message; anything else is logged with its traceback and shown as a
short generic message (no stack trace reaches the page).
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import gradio as gr

from attnctrl.consistency import REPOSITION_MODES, IRDiffusion
from attnctrl.inversion import METHODS
from attnctrl.pipelines.inversion import default_guidance
from attnctrl.pipelines.speed import POLICIES

from . import actions
from .models import SHAPES_NAME, ModelCache, check_model
from .options import (
    CONTEXT_CHOICES,
    MAX_SCENES,
    MAX_STEPS,
    MODES,
    OptionError,
    check_int,
    check_number,
    edit_form,
    parse_blend,
    parse_lines,
    parse_policies,
    parse_size,
    parse_subjects,
    user_message,
)

__all__ = ["build_app", "as_gradio_error", "guard", "EDIT_EXAMPLES", "CONCURRENCY_ID"]

logger = logging.getLogger("attnctrl.app")

CONCURRENCY_ID = "attnctrl-pipelines"
"""Every event that runs a model shares this queue slot group (limit: ``concurrency``)."""
STATE_TTL_S = 3600
"""Seconds a session's last result and inversion are kept."""
MAPS_LAST = "Last edit"
MAPS_GENERATE = "Generate a prompt"
MAX_SEED = 2**63 - 1
MAX_GUIDANCE = 50.0

EDIT_EXAMPLES = [
    ["a red circle on the left", "a blue circle on the left", "replace", "", ""],
    ["a yellow square on the right on a gray background", "a yellow star on the right on a gray background", "replace", "", "square, star"],
    ["a green triangle at the top", "a green triangle at the top on a black background", "refine", "", ""],
    ["a big purple circle in the centre", "", "reweight", "purple=3", ""],
]
"""Offline examples on the shapes model: source, edited prompts, mode, weights, blend words."""

_ERROR_KWARGS = {
    name: value
    for name, value in (("print_exception", False),)
    if name in inspect.signature(gr.Error.__init__).parameters
}


def as_gradio_error(exc: BaseException) -> gr.Error:
    """``exc`` as the ``gr.Error`` the page shows: the library's message for a user error, a short
    generic message (the traceback goes to the server log) for anything else."""
    if isinstance(exc, gr.Error):
        return exc
    message = user_message(exc)
    if message is None:
        logger.error("unexpected error in the web UI", exc_info=(type(exc), exc, exc.__traceback__))
        message = f"Something went wrong inside attnctrl ({type(exc).__name__}); the details are in the server's log."
    return gr.Error(message, **_ERROR_KWARGS)


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a handler so that every exception reaches the page as :func:`as_gradio_error`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001 - everything becomes a message, nothing a stack trace
            raise as_gradio_error(exc) from None

    return wrapper


def _sampling(seed: Any, steps: Any, guidance: Any, size: Any) -> tuple[int, int, float, tuple[int, int] | None]:
    return (
        check_int(seed, "Seed", 0, MAX_SEED),
        check_int(steps, "Steps", 1, MAX_STEPS),
        check_number(guidance, "Guidance", 0.0, MAX_GUIDANCE),
        parse_size(size),
    )


def _gallery(images: list[Any], captions: list[str]) -> list[tuple[Any, str]]:
    return [(actions.display(image), caption) for image, caption in zip(images, captions)]


def _edit_controls(prefix: str, *, source: bool) -> dict[str, Any]:
    """The edit fields shared by the Edit and Real image tabs."""
    c: dict[str, Any] = {}
    if source:
        c["source"] = gr.Textbox(label="Source prompt", value="a red circle on the left", elem_id=f"{prefix}-source")
    c["edited"] = gr.Textbox(
        label="Edited prompts (one per line)", lines=2, value="a blue circle on the left" if source else "",
        elem_id=f"{prefix}-edited",
        info="Replace: same number of words as the source (a word swap). Refine: add or change words freely. "
        "Reweight: may be left empty to reweight the source prompt itself.",
    )
    c["mode"] = gr.Radio(list(MODES), value="replace", label="Mode", elem_id=f"{prefix}-mode")
    with gr.Accordion("Edit options", open=True):
        c["weights"] = gr.Textbox(
            label="Word weights (one word=factor per line)", lines=2, placeholder="red=2.0", elem_id=f"{prefix}-weights",
            info="Scales a word's attention in the edited prompts (negative allowed; word=0.5,3 = one factor per edited prompt). "
            "Chained after Replace/Refine.",
        )
        c["blend"] = gr.Textbox(
            label="Blend words (LocalBlend)", lines=1, placeholder="circle   or   cat, tiger", elem_id=f"{prefix}-blend",
            info="Only the region of these words may change. One word for every prompt, or one per prompt "
            "(comma-separated, source first); one entry per line.",
        )
        c["blend_threshold"] = gr.Textbox(
            label="Blend threshold", lines=1, placeholder="blank: 0.3", elem_id=f"{prefix}-blend-threshold",
            info="LocalBlend's threshold on the normalised word map; raise it (e.g. 0.5) when the mask covers too much",
        )
        c["cross"] = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="Cross-attention steps", elem_id=f"{prefix}-cross",
                               info="fraction of the steps that follow the source's cross-attention (Replace: of the "
                               "swapped words)")
        c["shared"] = gr.Textbox(
            label="Shared words' cross-attention steps (Replace)", lines=1, placeholder="blank: default   or   0.8   or   off",
            elem_id=f"{prefix}-shared",
            info="Replace: the fraction of the steps the words the prompts share keep the source's maps (blank: all "
            "steps with the source's text encoding on SD/SDXL, else the cross value); off: the cross value "
            "(official Prompt-to-Prompt)",
        )
        c["self"] = gr.Slider(0.0, 1.0, value=0.4, step=0.05, label="Self-attention steps", elem_id=f"{prefix}-self",
                              info="fraction of the steps that take the source's self-attention")
        c["cross_words"] = gr.Textbox(
            label="Per-word cross windows (one word=fraction per line)", lines=1, placeholder="tiger=0.4",
            elem_id=f"{prefix}-cross-words",
        )
        c["context"] = gr.Radio(
            list(CONTEXT_CHOICES), value="default", label="Shared words' text encoding", elem_id=f"{prefix}-context",
            info="source: the edited prompts read the source's encoding of the words they share with it, so only "
            "the swapped words differ (default for Replace on SD/SDXL); own: each prompt encoded on its own "
            "(official Prompt-to-Prompt, Refine's default; SD3/Flux)",
        )
    return c


def _sampling_controls(prefix: str, steps: int = 50) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        c["seed"] = gr.Number(value=0, precision=0, label="Seed", minimum=0, elem_id=f"{prefix}-seed")
        c["steps"] = gr.Slider(1, 100, value=steps, step=1, label="Steps", elem_id=f"{prefix}-steps")
    with gr.Row():
        c["guidance"] = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="Guidance", elem_id=f"{prefix}-guidance")
        c["size"] = gr.Textbox(label="Size (WxH, blank: the model's own)", placeholder="512x512", elem_id=f"{prefix}-size")
    return c


def _edit_inputs(c: dict[str, Any]) -> list[Any]:
    return [c["edited"], c["mode"], c["weights"], c["blend"], c["cross"], c["cross_words"], c["self"], c["context"], c["shared"], c["blend_threshold"]]


INTRO = """# attnctrl
Training-free attention control for diffusers: edit a generated or real image by editing its prompt
(Prompt-to-Prompt), look at each word's attention, keep subjects consistent across scenes, and time
efficient attention (agent, agentsd, window, proxy, grouped) against stock attention.
The default model is the small embedded **shapes** model (64x64 scenes of coloured shapes; offline);
type a hub id (`org/name`) or a local diffusers folder to use another Stable Diffusion 1.x/2.x or SDXL model
(SD3/SD3.5 and Flux.1 too, for editing and attention maps)."""


def build_app(
    model: str | None = None,
    *,
    device: str | None = "auto",
    dtype: Any = "auto",
    backend: str | None = None,
    concurrency: int = 1,
    max_models: int = 2,
    preload: bool = False,
    cache: ModelCache | None = None,
    steps: int = 50,
) -> gr.Blocks:
    """Build the web UI (not launched). See :func:`attnctrl.app.build_app`."""
    check_model(model)  # a bad default model fails now
    if concurrency < 1:
        raise OptionError(f"concurrency must be at least 1, got {concurrency}")
    steps = check_int(steps, "steps", 1, 100)
    cache = cache or ModelCache(device=device, dtype=dtype, max_models=max_models, backend=backend)
    default_model = SHAPES_NAME if model is None or check_model(model) == check_model(None) else model.strip()
    if preload:
        cache.get(default_model)
    heavy = dict(concurrency_limit=concurrency, concurrency_id=CONCURRENCY_ID)

    # ---------------------------------------------------------------- handlers
    @guard
    def load_model(model_text: str, progress: gr.Progress = gr.Progress(track_tqdm=True)) -> str:
        progress(0, desc="Loading the model")
        return cache.get(model_text).describe()

    @guard
    def edit(model_text, source, edited, mode, weights, blend, cross, cross_words, self_end, context, shared, blend_threshold,
             seed, steps_, guidance, size, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        form = edit_form(source, edited, mode, weights, blend, cross, cross_words, self_end, context, shared, blend_threshold)
        seed, steps_, guidance, size = _sampling(seed, steps_, guidance, size)
        progress(0, desc="Loading the model")
        loaded = cache.get(model_text)
        progress(0, desc="Generating")
        result = actions.run_edit(loaded, form, seed=seed, steps=steps_, guidance=guidance, size=size)
        return _gallery(result.images, result.captions()), result.summary, result

    @guard
    def maps(model_text, choice, prompt, words, seed, steps_, guidance, size, last,
             progress: gr.Progress = gr.Progress(track_tqdm=True)):
        if choice == MAPS_LAST:
            result = last
            if result is None:
                raise OptionError("No edit yet: run one on the Edit or Real image tab, or choose 'Generate a prompt'")
        else:
            seed, steps_, guidance, size = _sampling(seed, steps_, guidance, size)
            progress(0, desc="Loading the model")
            loaded = cache.get(model_text)
            progress(0, desc="Generating")
            result = actions.generate_maps(loaded, prompt, seed=seed, steps=steps_, guidance=guidance, size=size)
        return actions.attention_figure(result, words), result.summary

    @guard
    def preview(path):
        return actions.preview_image(path)

    @guard
    def invert(model_text, path, caption, method, steps_, guidance, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        steps_ = check_int(steps_, "Inversion steps", 1, MAX_STEPS)
        guidance = check_number(guidance, "Guidance", 0.0, MAX_GUIDANCE)
        progress(0, desc="Loading the model")
        loaded = cache.get(model_text)
        progress(0, desc=f"{method} inversion")
        inversion = actions.run_invert(loaded, path, caption, method=method, steps=steps_, guidance=guidance)
        return inversion, actions.inversion_summary(inversion, loaded)

    @guard
    def edit_real(model_text, inversion, edited, mode, weights, blend, cross, cross_words, self_end, context, shared,
                  blend_threshold, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        if inversion is None:
            raise OptionError("Invert an image first: upload it, give its caption and press Invert")
        form = edit_form(inversion.prompts[0], edited, mode, weights, blend, cross, cross_words, self_end, context, shared,
                         blend_threshold)
        progress(0, desc="Loading the model")
        loaded = cache.get(model_text)
        progress(0, desc="Editing")
        result = actions.run_edit_inversion(loaded, inversion, form)
        return _gallery(result.images, result.captions()), result.summary, result

    @guard
    def flow_edit_real(model_text, path, caption, target, steps_, n_max, source_g, target_g, seed, blend,
                       blend_threshold, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        steps_ = None if not steps_ else check_int(steps_, "FlowEdit steps", 1, MAX_STEPS)
        n_max = None if not n_max else check_int(n_max, "n_max", 1, MAX_STEPS)
        source_g = None if source_g in (None, "") else check_number(source_g, "Source guidance", 0.0, MAX_GUIDANCE)
        target_g = None if target_g in (None, "") else check_number(target_g, "Target guidance", 0.0, MAX_GUIDANCE)
        seed = check_int(seed or 0, "Seed", 0, MAX_SEED)
        blend_words = parse_blend(blend, 2)
        blend_threshold = check_number(0.3 if blend_threshold in (None, "") else blend_threshold, "Blend threshold", 0.0, 1.0)
        progress(0, desc="Loading the model")
        loaded = cache.get(model_text)
        progress(0, desc="FlowEdit")
        images, summary = actions.run_flow_edit(loaded, path, caption, target, steps=steps_, n_max=n_max,
                                                source_guidance=source_g, target_guidance=target_g, seed=seed, blend=blend_words,
                                                blend_threshold=blend_threshold)
        captions = ["source (as read)", f"FlowEdit: {(target or '').strip()}", "LocalBlend mask (white: may change)"]
        return _gallery(images, captions[: len(images)]), summary

    @guard
    def consistent(model_text, subjects_text, scenes_text, isolate, reference, reposition, dropout, mutual_cross,
                   seed, steps_, guidance, size, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        subjects = parse_subjects(subjects_text)
        scenes = parse_lines(scenes_text)
        if not scenes:
            raise OptionError("Scenes: give at least one scene prompt (one per line) naming the subjects by their word")
        if len(scenes) > MAX_SCENES:
            raise OptionError(f"Scenes: at most {MAX_SCENES} scenes, got {len(scenes)}")
        seed, steps_, guidance, size = _sampling(seed, steps_, guidance, size)
        settings = IRDiffusion(isolate=bool(isolate), reference=bool(reference), reposition=reposition,
                               dropout=float(dropout), mutual_cross=float(mutual_cross), seed=seed)
        progress(0, desc="Loading the model")
        loaded = cache.get(model_text)
        progress(0, desc="Generating")
        result = actions.run_consistent(loaded, subjects, scenes, settings=settings, seed=seed, steps=steps_,
                                        guidance=guidance, size=size)
        return (
            [(actions.display(im), cap) for im, cap in result.references],
            [(actions.display(im), cap) for im, cap in result.scenes],
            [(actions.display(im), cap) for im, cap in result.masks],
            result.summary,
        )

    @guard
    def speed(model_text, prompt, selected, options_text, seed, steps_, guidance, size,
              progress: gr.Progress = gr.Progress(track_tqdm=True)):
        policies = parse_policies(selected, options_text)
        seed, steps_, guidance, size = _sampling(seed, steps_, guidance, size)
        progress(0, desc="Loading the model")
        loaded = cache.get(model_text)
        result = actions.run_speed(loaded, prompt, policies, seed=seed, steps=steps_, guidance=guidance, size=size,
                                   progress=lambda fraction, desc: progress(fraction, desc=desc))
        return result.images, result.table + "\n\n" + result.summary

    # ---------------------------------------------------------------- layout
    with gr.Blocks(title="attnctrl", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            model_box = gr.Textbox(
                value=default_model, label="Model", scale=4, elem_id="model",
                info="'shapes' (embedded, offline), a hub id like org/name, or a diffusers model folder (with model_index.json)",
            )
            with gr.Column(scale=1, min_width=160):
                load_button = gr.Button("Load model", elem_id="model-load")
        model_info = gr.Markdown(elem_id="model-info")
        last = gr.State(None, time_to_live=STATE_TTL_S)

        with gr.Tab("Edit", elem_id="tab-edit"):
            with gr.Row():
                with gr.Column(scale=2):
                    e = _edit_controls("edit", source=True)
                    with gr.Accordion("Sampling", open=False):
                        es = _sampling_controls("edit", steps=steps)
                    edit_button = gr.Button("Edit", variant="primary", elem_id="edit-run")
                with gr.Column(scale=3):
                    edit_gallery = gr.Gallery(label="Source and edits", columns=3, format="png", object_fit="contain", preview=False,
                                              height="auto", elem_id="edit-gallery")
                    edit_info = gr.Markdown(elem_id="edit-info")
            gr.Examples(EDIT_EXAMPLES, [e["source"], e["edited"], e["mode"], e["weights"], e["blend"]],
                        label="Examples (shapes model, offline)")

        with gr.Tab("Attention maps", elem_id="tab-maps"):
            with gr.Row():
                with gr.Column(scale=2):
                    maps_choice = gr.Radio([MAPS_LAST, MAPS_GENERATE], value=MAPS_LAST, label="Maps of", elem_id="maps-choice")
                    maps_prompt = gr.Textbox(label="Prompt (for 'Generate a prompt')", value="a green triangle at the top",
                                             elem_id="maps-prompt")
                    maps_words = gr.Textbox(label="Words (comma-separated; blank: the words that differ, blend and weight words)",
                                            elem_id="maps-words")
                    with gr.Accordion("Sampling (for 'Generate a prompt')", open=False):
                        ms = _sampling_controls("maps", steps=steps)
                    maps_button = gr.Button("Show attention maps", variant="primary", elem_id="maps-run")
                with gr.Column(scale=3):
                    maps_image = gr.Image(label="Attention maps", show_label=False, type="pil", format="png",
                                          interactive=False, elem_id="maps-image")
                    gr.Markdown("Cross-attention of each word over its image, averaged over steps, layers and heads.")
                    maps_info = gr.Markdown(elem_id="maps-info")

        with gr.Tab("Real image", elem_id="tab-real"):
            inversion_state = gr.State(None, time_to_live=STATE_TTL_S)
            with gr.Row():
                with gr.Column(scale=2):
                    upload = gr.File(label="Image (PNG, JPEG, WebP)", file_types=["image"], type="filepath", elem_id="real-upload")
                    caption = gr.Textbox(label="Caption (the source prompt)", elem_id="real-caption",
                                         placeholder="a red circle on the left")
                    with gr.Row():
                        method = gr.Dropdown(list(METHODS), value="null-text", label="Inversion method", elem_id="real-method",
                                             info="UNets: null-text, ddim, ...; SD3/Flux: fireflow, rf-solver, rf-bdia (exact), rf-euler, rf-inversion")
                        inv_steps = gr.Slider(1, 100, value=steps, step=1, label="Steps", elem_id="real-steps")
                        inv_guidance = gr.Slider(1.0, 20.0, value=7.5, step=0.5, label="Guidance", elem_id="real-guidance",
                                                  info="set to the method's default when it changes: 7.5, edit-friendly 3.5; SD3/Flux: 1 for the flow solvers, 3.5 for rf-inversion")
                    invert_button = gr.Button("Invert", variant="primary", elem_id="real-invert")
                    invert_info = gr.Markdown(elem_id="real-invert-info")
                    r = _edit_controls("real", source=False)
                    real_button = gr.Button("Edit", variant="primary", elem_id="real-run")
                    with gr.Accordion("FlowEdit (SD3/SD3.5 and Flux models: no inversion)", open=False, elem_id="real-flowedit"):
                        gr.Markdown("Edits the uploaded image from its caption to the target prompt directly (Kulikov et al.). "
                                    "Needs a flow model, e.g. the embedded flow shapes model; empty numbers = the paper's "
                                    "defaults (SD3: 50 steps, n_max 33, guidance 3.5 / 13.5; Flux: 28, 24, 1.5 / 5.5).")
                        fe_target = gr.Textbox(label="Target prompt", elem_id="real-fe-target", placeholder="a blue circle on the left")
                        with gr.Row():
                            fe_steps = gr.Number(value=None, precision=0, label="Steps", elem_id="real-fe-steps")
                            fe_nmax = gr.Number(value=None, precision=0, label="n_max (edit strength)", elem_id="real-fe-nmax")
                            fe_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="real-fe-seed")
                        with gr.Row():
                            fe_src_g = gr.Number(value=None, label="Source guidance", elem_id="real-fe-src-g")
                            fe_tgt_g = gr.Number(value=None, label="Target guidance", elem_id="real-fe-tgt-g")
                        with gr.Row():
                            fe_blend = gr.Textbox(label="Blend words (LocalBlend: only their region changes)", lines=1,
                                                  placeholder="circle   or   cat, tiger", elem_id="real-fe-blend")
                            fe_blend_threshold = gr.Number(value=0.3, label="Blend threshold (raise if the mask covers too much)",
                                                           minimum=0.0, maximum=1.0, elem_id="real-fe-blend-threshold")
                        fe_button = gr.Button("FlowEdit", variant="primary", elem_id="real-fe-run")
                with gr.Column(scale=3):
                    preview_image = gr.Image(label="Uploaded image (as attnctrl reads it: RGB, centre-cropped)", type="pil", interactive=False,
                                             elem_id="real-preview")
                    real_gallery = gr.Gallery(label="Reconstruction and edits", columns=3, format="png", object_fit="contain", preview=False,
                                              height="auto", elem_id="real-gallery")
                    real_info = gr.Markdown(elem_id="real-info")

        with gr.Tab("Consistent subjects", elem_id="tab-consistent"):
            with gr.Row():
                with gr.Column(scale=2):
                    subjects_box = gr.Textbox(
                        label="Subjects (one per line: name | portrait prompt | word)", lines=2, elem_id="cs-subjects",
                        value="ball | a red circle in the centre | circle",
                    )
                    scenes_box = gr.Textbox(label="Scenes (one per line, naming subjects by their word)", lines=3,
                                            elem_id="cs-scenes", value="a red circle on the left\na red circle at the top")
                    with gr.Accordion("IR-Diffusion settings", open=False):
                        with gr.Row():
                            isolate = gr.Checkbox(value=True, label="Isolation attention")
                            reference = gr.Checkbox(value=True, label="Reference attention")
                        reposition = gr.Radio(list(REPOSITION_MODES), value="bbox", label="Reposition references")
                        with gr.Row():
                            dropout = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Reference dropout")
                            mutual_cross = gr.Slider(0.0, 1.0, value=0.9, step=0.05, label="Mutual cross-attention")
                    with gr.Accordion("Sampling", open=False):
                        cs = _sampling_controls("cs", steps=steps)
                    cs_button = gr.Button("Generate", variant="primary", elem_id="cs-run")
                with gr.Column(scale=3):
                    refs_gallery = gr.Gallery(label="References", columns=4, format="png", height="auto", preview=False, elem_id="cs-references")
                    scenes_gallery = gr.Gallery(label="Scenes", columns=4, format="png", height="auto", preview=False, elem_id="cs-scenes-out")
                    masks_gallery = gr.Gallery(label="Subject masks", columns=4, format="png", height="auto", preview=False, elem_id="cs-masks")
                    cs_info = gr.Markdown(elem_id="cs-info")
            gr.Examples(
                [["ball | a red circle in the centre | circle", "a red circle on the left\na red circle at the top"],
                 ["ball | a red circle in the centre | circle\nbox | a blue square in the centre | square",
                  "a red circle and a blue square\na blue square at the top"]],
                [subjects_box, scenes_box], label="Examples (shapes model, offline)",
            )

        with gr.Tab("Speed", elem_id="tab-speed"):
            with gr.Row():
                with gr.Column(scale=2):
                    speed_prompt = gr.Textbox(label="Prompt", value="a red circle on the left and a blue square at the top right",
                                              elem_id="speed-prompt")
                    speed_policies = gr.CheckboxGroup(list(POLICIES), value=["agent", "window"], label="Efficient attention",
                                                      elem_id="speed-policies",
                                                      info="agent: AgentSD's agent attention; agentsd: AgentSD's full schedule (agents + ToMe merge, then ToMe); proxy: window + proxy tokens; grouped: GRAT; window: HiDiffusion MSW-MSA")
                    speed_options = gr.Textbox(label="Policy options (optional, one per line: NAME:KEY=VALUE,...)", lines=2,
                                               placeholder="agent:agents=pool,steps=0,0.6\ngrouped:pattern=criss-cross",
                                               elem_id="speed-options")
                    with gr.Accordion("Sampling", open=False):
                        ss = _sampling_controls("speed", steps=min(steps, 20))
                    speed_button = gr.Button("Compare", variant="primary", elem_id="speed-run")
                with gr.Column(scale=3):
                    speed_gallery = gr.Gallery(label="Stock attention and each policy (same noise)", columns=3, format="png",
                                               height="auto", preview=False, elem_id="speed-gallery")
                    speed_info = gr.Markdown(elem_id="speed-info")

        # ------------------------------------------------------------ events
        load_button.click(load_model, [model_box], [model_info], **heavy)
        edit_button.click(
            edit,
            [model_box, e["source"], *_edit_inputs(e), es["seed"], es["steps"], es["guidance"], es["size"]],
            [edit_gallery, edit_info, last], **heavy,
        )
        maps_button.click(
            maps, [model_box, maps_choice, maps_prompt, maps_words, ms["seed"], ms["steps"], ms["guidance"], ms["size"], last],
            [maps_image, maps_info], **heavy,
        )
        speed_button.click(
            speed, [model_box, speed_prompt, speed_policies, speed_options, ss["seed"], ss["steps"], ss["guidance"], ss["size"]],
            [speed_gallery, speed_info], **heavy,
        )
        upload.change(preview, [upload], [preview_image])
        method.change(default_guidance, [method], [inv_guidance])  # each method's own default (edit-friendly 3.5)
        invert_button.click(invert, [model_box, upload, caption, method, inv_steps, inv_guidance],
                            [inversion_state, invert_info], **heavy)
        real_button.click(edit_real, [model_box, inversion_state, *_edit_inputs(r)], [real_gallery, real_info, last], **heavy)
        fe_button.click(flow_edit_real, [model_box, upload, caption, fe_target, fe_steps, fe_nmax, fe_src_g, fe_tgt_g, fe_seed, fe_blend,
                                                         fe_blend_threshold],
                        [real_gallery, real_info], **heavy)
        cs_button.click(
            consistent,
            [model_box, subjects_box, scenes_box, isolate, reference, reposition, dropout, mutual_cross,
             cs["seed"], cs["steps"], cs["guidance"], cs["size"]],
            [refs_gallery, scenes_gallery, masks_gallery, cs_info], **heavy,
        )
    demo.attnctrl_cache = cache  # type: ignore[attr-defined] - for tests and embedding apps
    return demo
