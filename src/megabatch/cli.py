"""The `megabatch` command: `megabatch bench ...` and `megabatch train ...`."""
from __future__ import annotations

import sys
from typing import Optional

USAGE = """usage: megabatch {bench,train} [options]

  bench   time and peak memory of the losses (megabatch backends, and peers with --peers)
  train   train a CLIP/SigLIP model (also: torchrun --nproc_per_node N -m megabatch.train ...)

Run `megabatch COMMAND --help` for a command's options."""


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if command == "train":
        from .train.__main__ import main as train_main

        return train_main(rest)
    print(f"megabatch: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
