"""The `megabatch` command: a subcommand name -> the module whose `main(argv)` runs it.

Dispatch is by module name (importlib), so the library itself never imports the training app.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

COMMANDS = {
    "bench": ("megabatch.bench", "time and peak memory of the losses (megabatch backends, and peers with --peers)"),
    "plan": ("megabatch.plan", "per-rank peak memory and bytes sent of a loss step; which strategies/backends fit --gpu-mem"),
    "train": ("megabatch.train.cli", "train a CLIP/SigLIP model (also: torchrun --nproc_per_node N -m megabatch.train ...)"),
    "study": ("megabatch.train.study", "why 32k? held-out retrieval against batch size, CLIP vs SigLIP, on real data"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {name:<{width}}   {text}" for name, (_, text) in COMMANDS.items()]
    return (f"usage: megabatch {{{','.join(COMMANDS)}}} [options]\n\n" + "\n".join(lines)
            + "\n\nRun `megabatch COMMAND --help` for a command's options.")


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"megabatch: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
