"""Runs the documentation's code for tests/test_docs.py in ONE process (torch is imported once).

Reads a JSON list of jobs on stdin and writes a JSON object {job id: error text or ""} to stdout.
Jobs:
  {"id", "kind": "python", "code"}       exec'd in a fresh namespace, as if pasted into a file
  {"id", "kind": "megabatch", "argv"}    `megabatch ARGV`; `plan` runs in full (it is arithmetic),
                                         `train` is parsed and validated by its config, every other
                                         command is stopped once its parser has accepted the flags
  {"id", "kind": "torchrun", "argv"}     torchrun's flags parsed by torchrun's parser, then the
                                         script or -m module's own flags by its parser (nothing runs)
  {"id", "kind": "script", "argv"}       `python SCRIPT ARGS` / `python -m MODULE ARGS`: parsed only
A command whose parser rejects its flags exits 2 there: that is reported as the job's error.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import runpy
import sys
import traceback
from typing import Any, Callable


class Parsed(Exception):
    """Raised in place of running a command once its argument parser has accepted the flags."""

    def __init__(self, namespace: argparse.Namespace):
        super().__init__("parsed")
        self.namespace = namespace


@contextlib.contextmanager
def parse_only():
    """Every ArgumentParser.parse_args validates as usual (exit 2 on a bad flag), then stops."""
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        raise Parsed(real(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_and_stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real  # type: ignore[method-assign]


def stopped_after_parsing(run: Callable[[], Any], what: str) -> None:
    """Call `run` under parse_only(); it must stop at its parser (or exit 0, e.g. for --help)."""
    try:
        with parse_only():
            run()
    except Parsed:
        return
    except SystemExit as e:
        if e.code in (0, None):
            return
        raise AssertionError(f"{what}: its parser rejected the arguments (exit {e.code})") from None
    raise AssertionError(f"{what}: finished without parsing any arguments (nothing to check)")


def run_target(argv: list[str], module: bool) -> None:
    """`python -m MODULE ARGS` (module=True) or `python SCRIPT ARGS`, parsed only."""
    target, args = argv[0], argv[1:]
    if module and target == "megabatch_train":  # the app validates its whole config after parsing
        from megabatch_train.config.flags import parse_args

        parse_args(args)
        return
    saved = sys.argv
    sys.argv = [target, *args]
    try:
        if module:
            stopped_after_parsing(lambda: runpy.run_module(target, run_name="__main__", alter_sys=True),
                                  f"python -m {target}")
        else:
            stopped_after_parsing(lambda: runpy.run_path(target, run_name="__main__"), f"python {target}")
    finally:
        sys.argv = saved


def megabatch_command(argv: list[str]) -> None:
    from megabatch import cli

    if argv[:1] == ["plan"]:
        rc = cli.main(argv)
        assert rc == 0, f"megabatch plan exited {rc}"
    elif argv[:1] == ["train"]:
        from megabatch_train.config.flags import parse_args

        parse_args(argv[1:])
    else:
        stopped_after_parsing(lambda: cli.main(argv), f"megabatch {' '.join(argv[:1])}")


def torchrun_command(argv: list[str]) -> None:
    from torch.distributed import run as torchrun

    try:
        with parse_only():
            torchrun.parse_args(argv)
        raise AssertionError("torchrun did not parse its arguments")
    except Parsed as p:
        ns = p.namespace
    except SystemExit as e:
        raise AssertionError(f"torchrun rejected its arguments (exit {e.code})") from None
    run_target([ns.training_script, *ns.training_script_args], module=bool(ns.module))


def run_job(job: dict[str, Any]) -> None:
    kind = job["kind"]
    if kind == "python":
        code = compile(job["code"], job["id"], "exec")
        exec(code, {"__name__": "__main__"})  # noqa: S102 - the documentation's own example, as printed
    elif kind == "megabatch":
        megabatch_command(job["argv"])
    elif kind == "torchrun":
        torchrun_command(job["argv"])
    elif kind == "script":
        argv = job["argv"]
        run_target(argv[1:], module=True) if argv[0] == "-m" else run_target(argv, module=False)
    else:
        raise ValueError(f"unknown job kind {kind!r}")


def main() -> None:
    jobs = json.load(sys.stdin)
    results: dict[str, str] = {}
    real_stdout = sys.stdout
    for job in jobs:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                run_job(job)
            results[job["id"]] = ""
        except BaseException:  # noqa: BLE001 - every failure (SystemExit included) is the job's result
            results[job["id"]] = traceback.format_exc()[-3000:] + "\n--- output ---\n" + out.getvalue()[-2000:]
    real_stdout.write("\n" + json.dumps(results) + "\n")
    real_stdout.flush()
    os._exit(0)  # skip interpreter teardown (threads some blocks may have left behind)


if __name__ == "__main__":
    main()
