"""The Gradio web UI: ``attnctrl app`` or ``python -m attnctrl.app``.

Built on :mod:`attnctrl.pipelines` only. Tabs: Edit (Prompt-to-Prompt on generated images),
Attention maps, Real image (invert once, edit many) and Consistent subjects (IR-Diffusion).

Security defaults: it listens on 127.0.0.1, a public share link is made only with ``share=True``,
requests that run a model share a queue with a concurrency limit (1 by default; calls on one model
never overlap), uploads are limited to ``max_file_size``, and a model typed in the page must be a
diffusers folder (with ``model_index.json``) or a hub id ``org/name``.

Needs the ``app`` extra (``pip install 'attnctrl[app]'``); importing this package imports gradio only
when :func:`build_app` or :func:`launch` is called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app", "launch", "DEFAULT_HOST", "DEFAULT_MAX_FILE_SIZE"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_FILE_SIZE = "10mb"


def _gradio() -> Any:
    try:
        import gradio
    except ImportError as err:  # pragma: no cover - depends on the environment
        from .options import OptionError

        raise OptionError("the web UI needs gradio: pip install 'attnctrl[app]'") from err
    return gradio


def build_app(
    model: str | None = None,
    *,
    device: str | None = "auto",
    dtype: Any = "auto",
    backend: str | None = None,
    concurrency: int = 1,
    max_models: int = 2,
    preload: bool = False,
    steps: int = 50,
) -> Any:
    """Build the web UI as a ``gr.Blocks`` (not launched; call ``.queue()`` and ``.launch()``, or use
    :func:`launch`).

    Args:
        model: the model shown first: None or ``"shapes"`` for the embedded shapes model, a hub id
            or a diffusers folder. Users can type another one in the page.
        device, dtype: where models are loaded (``auto``: CUDA with fp16 when available, else CPU
            fp32). The cache keys models by (model, device, dtype).
        backend: attention kernel backend for every loaded model (None: the best for each call).
        concurrency: how many model calls may run at once (calls on one model never overlap).
        max_models: loaded models kept in memory (least recently used first out).
        preload: load ``model`` now (a bad model fails here, and the first request is fast).
        steps: the default number of sampling steps in the forms.
    """
    _gradio()
    from .ui import build_app as _build

    return _build(model, device=device, dtype=dtype, backend=backend, concurrency=concurrency,
                  max_models=max_models, preload=preload, steps=steps)


def launch(
    model: str | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    share: bool = False,
    device: str | None = "auto",
    dtype: Any = "auto",
    backend: str | None = None,
    concurrency: int = 1,
    queue_size: int = 16,
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    max_models: int = 2,
    preload: bool = True,
    steps: int = 50,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
    **launch_kwargs: Any,
) -> Any:
    """Build and serve the web UI; returns the ``gr.Blocks`` (blocks until stopped unless
    ``prevent_thread_lock``).

    Args:
        host: the address to listen on (default 127.0.0.1, this machine only; ``0.0.0.0`` serves
            the network).
        port: the port (None: Gradio's choice, 7860 or the next free one, or GRADIO_SERVER_PORT).
        share: also make a public gradio.live link (off unless asked).
        concurrency: model calls running at once; queue_size: requests waiting at most.
        max_file_size: largest upload (e.g. ``"10mb"`` or a number of bytes).
        Other arguments: see :func:`build_app`; ``launch_kwargs`` go to ``gr.Blocks.launch``.
    """
    if queue_size < 1:
        from .options import OptionError

        raise OptionError(f"queue_size must be at least 1, got {queue_size}")
    demo = build_app(model, device=device, dtype=dtype, backend=backend, concurrency=concurrency,
                     max_models=max_models, preload=preload, steps=steps)
    demo.queue(default_concurrency_limit=concurrency, max_size=queue_size)
    options: dict[str, Any] = dict(
        server_name=host, server_port=port, share=bool(share), max_file_size=max_file_size, show_error=False,
        prevent_thread_lock=prevent_thread_lock, quiet=quiet, ssr_mode=False,
    )
    options.update(launch_kwargs)
    demo.launch(**options)
    return demo
