"""One training run. `loop.train` is the start: `build.prepare` makes the run's parts from the config and
the plan (`plan.py`, every decision taken once); `step.py` is one optimizer step; `checkpoint.py` writes
and reads the checkpoint files and `identity.py` tells whether one belongs to this run; `runtime.py`,
`preempt.py`, `faults.py`, `teardown.py`, `health.py` and `fsdp.py` are the processes, signals,
deliberate faults, ending after a failure, learning health and FSDP2 layout."""
