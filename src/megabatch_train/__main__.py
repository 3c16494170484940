"""`python -m megabatch_train ...` (and `torchrun --nproc_per_node N -m megabatch_train ...`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
