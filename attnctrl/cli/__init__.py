"""The entry-point wing: the ``attnctrl`` command line, batch jobs, and what they share with the web UI.

* :mod:`attnctrl.cli.options` — the one option grammar (and its one error type, ``OptionError``)
  used by the CLI, batch files, the web UI and ``attnctrl speed``;
* :mod:`attnctrl.cli.run` — load a model, pick a scheduler, check outputs and memory up front;
* :mod:`attnctrl.cli.batch` — resumable JSON-lines batch jobs;
* :mod:`attnctrl.cli.commands` — the subcommands, their parser and :func:`main`.

Importing this package is light: nothing here imports diffusers until a command runs.
"""

from .commands import build_parser, main

__all__ = ["main", "build_parser"]
