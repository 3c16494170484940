"""`python -m megabatch.train ...` (and `torchrun --nproc_per_node N -m megabatch.train ...`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
