"""megabatch train: a CLIP/SigLIP run at a huge contrastive batch (GradCache + megabatch losses).

Usage:
    megabatch train --preset demo                       # also: python -m megabatch_train
    megabatch train --loss siglip --batch-size 8192 --micro-batch-size 512 --steps 300 --output runs/x
    megabatch train --data csv:pairs.tsv --preset small   # or --data wds:'shards/{000..099}.tar'
    megabatch train --resume runs/x                      # continue from the newest checkpoint
    megabatch train --preset demo                        # again: resumes from runs/demo/checkpoints
    torchrun --max-restarts 3 --nproc_per_node N -m megabatch_train --ckpt-every 50 ...
                                                         # a killed rank: the workers restart and resume
    torchrun --nproc_per_node N -m megabatch_train ...   # N ranks (gloo on CPU, nccl on GPU); the
                                                         # global batch is split N ways, loss is ring
    torchrun --nproc_per_node N -m megabatch_train --fsdp ...  # FSDP2: parameters, gradients and
                                                         # optimizer state sharded N ways (N >= 2)

A run whose --output holds checkpoints of the same settings resumes from the newest loadable one
(different settings: an error; --fresh deletes them and starts over); run again once finished, it
says so and trains nothing. --output is created and proven writable before any work; a checkpoint
save that fails later is reported and retried at the next save (docs/operations.md). A non-finite loss or gradient
on any rank skips that update on every rank (counted as skipped_steps in metrics.jsonl); after
--max-bad-steps in a row the run stops. A collective that waits --dist-timeout seconds for a peer
fails with the collective's name, and that rank exits at once (exit 1) without waiting for its peers.

Preemption: SIGTERM (or SIGUSR1) stops every rank at the same step, after one checkpoint at that
step; the exit code is 128 + the signal's number (143 for SIGTERM, 138 for SIGUSR1) and the same
command resumes. Under torchrun the agent forwards SIGTERM (SIGUSR1 with --signals-to-handle
SIGTERM,SIGUSR1) and SIGKILLs workers after --shutdown-timeout (30 s). See docs/operations.md.
Exit codes: 0 done; 1 the run failed (non-finite steps past --max-bad-steps, a held-out evaluation
of a non-finite model, a failed collective, a missing [train] extra); 2 a usage error or unusable
input; 143 / 138 preempted (checkpoint written); 141 stdout's reader went away (`... | head`), quietly.
A --batch-size below the preset's micro-batch takes --micro-batch-size down to it unless that is given.

Presets: tiny, demo, small, base (see megabatch_train.config.sections.PRESETS); flags override a preset.
Outputs in --output: metrics.jsonl, eval.json, curves.png, config.json, checkpoints/step_*.pt.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    """Parse `argv` (default sys.argv[1:]), train, print the held-out summary. Returns an exit code:
    0 done; 1 the run failed (a non-finite model, a collective failure, a missing extra); 2 a usage error;
    141 stdout's reader went away. Warnings show as `megabatch train: warning: ...` (megabatch.cli.run_command,
    here too for `python -m megabatch_train` under torchrun)."""
    from megabatch.cli import missing_extra, run_command

    def run() -> int:
        try:
            return _main(argv)
        except ImportError as e:  # config.py needs only the standard library: --help and usage errors come first
            message = missing_extra(e, "megabatch train", "train")
            if message is None:
                raise
            print(message, file=sys.stderr)
            return 1

    return run_command("megabatch train", run)


def _main(argv: Optional[list[str]]) -> int:
    from megabatch.cli import usage_error

    from .config.flags import parse_args

    cfg, given = parse_args(argv, epilog=__doc__)
    import torch.distributed as dist

    from .run.checkpoint import CheckpointError
    from .run.identity import resume_config
    from .run.loop import train
    from .run.runtime import CollectiveError
    from .run.step import NonFiniteError
    from .run.preempt import SIGNALS, Preempted
    from .run.teardown import exit_now

    if cfg.resume:
        try:
            cfg = resume_config(cfg.resume, given)
        except (ValueError, FileNotFoundError) as e:
            return usage_error("megabatch train", str(e))
    if cfg.fsdp:
        from .run.fsdp import unusable

        reason = unusable(int(os.environ.get("WORLD_SIZE", "1")))
        if reason:
            return usage_error("megabatch train", reason)
    from .data.types import DataError
    from .evaluation.outputs import OutputError

    worker = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()  # train() joins torchrun
    try:
        final = train(cfg)
    except (DataError, CheckpointError, OutputError) as e:  # files, checkpoints or --output unusable as asked
        return usage_error("megabatch train", str(e))
    except Preempted as e:  # rank 0 said where the checkpoint is
        if worker:  # once one rank has exited, torchrun SIGTERMs the others: they are done, let them exit so
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
        return e.exit_code
    except CollectiveError as e:
        print(f"megabatch train: error: {e}", file=sys.stderr)
        if worker:  # the group failed: Python's teardown of it can deadlock (teardown.py); end here
            exit_now(1)
        return 1
    except NonFiniteError as e:
        print(f"megabatch train: error: {e}", file=sys.stderr)
        return 1
    if final.get("non_finite"):  # rank 0 only: the others return {}
        print("megabatch train: error: the trained model is not finite: its held-out metrics are NaN (eval.json: "
              "non_finite). Look at metrics.jsonl's loss and skipped_steps; try a lower --lr or more --warmup-steps",
              file=sys.stderr)
        return 1
    return 0
