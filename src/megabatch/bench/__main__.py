"""`python -m megabatch.bench ...` (and `torchrun --nproc_per_node N -m megabatch.bench ...`)."""
import sys

from .single import main

if __name__ == "__main__":
    sys.exit(main())
