"""`python -m megabatch.bench ...` (and `torchrun --nproc_per_node N -m megabatch.bench ...`): warnings and
a closed stdout as `megabatch bench` treats them (megabatch.cli.run_command)."""
import sys

from ..cli import run_command
from .single import main

if __name__ == "__main__":
    sys.exit(run_command("megabatch bench", main))
