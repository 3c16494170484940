"""WordNet 3.0's 117,659 synsets as (name, definition) text pairs, read offline from Debian's wordnet-base
(/usr/share/wordnet/data.{noun,verb,adj,adv}; format: `man 5 wndb`).

A synset's id is its ss_type letter and its 8-digit byte offset in its data file: "n02084071" (dog),
"v01168468", "a00001740", "r00001740", and "s00004413" for a satellite adjective. The letter of a satellite
is its own ss_type, "s", not "a": the data files' pointers name satellites that way, so an id here is
what a pointer holds. Ids are unique across the four files (the letter says which file).

Name: the synset's lemmas in file order, each with its adjective marker ("(a)", "(p)", "(ip)") removed,
underscores made spaces and lower-cased, a lemma equal to an earlier one of the same synset dropped
(37 synsets, e.g. "A", "a" -> "a"), joined by ", ": "bank, cant, camber". Lower-cased because the text
towers we train (MiniLM's tokenizer) are uncased: "March" and "march" are one input to them, so they must
be one caption, or two synsets that look identical to the model would be each other's false negatives.
Two synsets whose names are equal are positives of each other (caption-hash positives): 23,867 of the
117,659 synsets share their name with another (102,560 distinct names; 23,403 if case were kept).

Definition: the gloss cut before its first example, i.e. before the first `;` followed by optional
spaces and a `"`, stripped. 49 glosses introduce an example with ':' or ',' instead; they keep it.

Held-out split: `HELDOUT_FILE` (wordnet_heldout.txt, packaged with the app) lists 5,000 synset ids, drawn
once by `draw_heldout` (seed `HELDOUT_SEED`) as whole name groups: a held-out synset's name is the name of
no training synset, so evaluating on them retrieves names never trained on. Held-out synsets may share a
name with each other (949 of the 5,000 do; 4,415 distinct names), so evaluation must count an equal name
as a hit.

A malformed data line is skipped and counted (one warning per load with the count and the first one's
file:line); a missing file raises WordNetUnavailable, naming the install command. Parsing all four files
(21 MB) takes ~1 s (`load_synsets()`: 0.98 s measured on one core; ~3 s with both cores busy).
"""
from __future__ import annotations

import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .types import DataError

DEFAULT_ROOT = Path("/usr/share/wordnet")
INSTALL = "sudo apt-get install --no-install-recommends wordnet-base"
FILES = {"noun": "n", "verb": "v", "adj": "as", "adv": "r"}  # data.<file> -> the ss_types it holds
HELDOUT_FILE = Path(__file__).with_name("wordnet_heldout.txt")
HELDOUT_SIZE = 5000
HELDOUT_SEED = 1985

_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_EXAMPLE = re.compile(r';\s*"')
_OFFSET = re.compile(r"\d{8}")
_HEX2 = re.compile(r"[0-9a-fA-F]{2}")


class WordNetUnavailable(DataError):
    """The WordNet data files are not installed; the message names the command that installs them."""


@dataclass(frozen=True)
class Synset:
    """One synset: id ("n02084071"), name ("dog, domestic dog, canis familiaris") and definition."""

    id: str
    name: str
    definition: str


def normalise_name(lemmas: Iterable[str]) -> str:
    """The synset name of data-file lemmas: markers removed, '_' -> ' ', lower-cased, repeats dropped."""
    out: list[str] = []
    for lemma in lemmas:
        word = _MARKER.sub("", lemma).replace("_", " ").lower()
        if word not in out:
            out.append(word)
    return ", ".join(out)


def parse_line(line: str, ss_types: str = "nvasr") -> Synset:
    """One data line as a Synset; ValueError saying what is wrong if it is malformed."""
    head, bar, gloss = line.partition(" | ")
    if not bar:
        raise ValueError("no ' | ' before the gloss")
    fields = head.split()
    if len(fields) < 4:
        raise ValueError(f"{len(fields)} fields before the gloss, fewer than 4")
    offset, _, ss_type, w_cnt = fields[:4]
    if not _OFFSET.fullmatch(offset):
        raise ValueError(f"synset offset {offset!r} is not 8 decimal digits")
    if len(ss_type) != 1 or ss_type not in ss_types:
        raise ValueError(f"ss_type {ss_type!r} is not one of {', '.join(ss_types)}")
    if not _HEX2.fullmatch(w_cnt) or int(w_cnt, 16) == 0:
        raise ValueError(f"word count {w_cnt!r} is not two hex digits above 00")
    n = int(w_cnt, 16)
    if len(fields) < 5 + 2 * n:  # n (word, lex_id) pairs, then p_cnt
        raise ValueError(f"word count {w_cnt} (= {n}) but only {(len(fields) - 4) // 2} words before the gloss")
    if not fields[4 + 2 * n].isdigit():
        raise ValueError(f"pointer count {fields[4 + 2 * n]!r} after {n} words is not a number")
    lemmas = fields[4 : 4 + 2 * n : 2]
    if not all(_MARKER.sub("", lemma).strip("_") for lemma in lemmas):
        raise ValueError(f"an empty word among {' '.join(lemmas)}")
    definition = _EXAMPLE.split(gloss, maxsplit=1)[0].strip()
    if not definition:
        raise ValueError("an empty definition")
    return Synset(ss_type + offset, normalise_name(lemmas), definition)


def data_paths(root: Path | str | None = None) -> list[Path]:
    """The four data files a run reads: root/data.{noun,verb,adj,adv} (root: DEFAULT_ROOT, read when called)."""
    return [Path(DEFAULT_ROOT if root is None else root) / f"data.{name}" for name in FILES]


def load_synsets(root: Path | str = DEFAULT_ROOT) -> list[Synset]:
    """Every synset of root/data.{noun,verb,adj,adv}, in file order. Malformed lines (and repeated ids) are
    skipped, counted and named once in a warning; WordNetUnavailable if a data file is missing."""
    paths = dict(zip(data_paths(root), FILES.values()))
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise WordNetUnavailable(f"WordNet's data files are missing ({', '.join(missing)}): {INSTALL}")
    out: list[Synset] = []
    seen: set[str] = set()
    bad, first = 0, ""
    for path, types in paths.items():
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if raw.startswith(b"  "):  # the licence header
                    continue
                try:
                    synset = parse_line(raw.decode("utf-8").rstrip("\n"), types)
                    if synset.id in seen:
                        raise ValueError(f"id {synset.id} repeated")
                except ValueError as e:  # UnicodeDecodeError is one
                    bad += 1
                    first = first or f"{path}:{number}: {e}"
                    continue
                seen.add(synset.id)
                out.append(synset)
    if bad:
        warnings.warn(f"WordNet: skipped {bad} malformed data line(s); the first: {first}", stacklevel=2)
    return out


def draw_heldout(synsets: Sequence[Synset], size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[str]:
    """How HELDOUT_FILE was made: whole name groups in a seeded random order, a group taken if it still fits,
    until `size` ids; sorted. Depends only on the synsets' ids and names, not on their order."""
    groups: dict[str, list[str]] = {}
    for s in sorted(synsets, key=lambda s: s.id):
        groups.setdefault(s.name, []).append(s.id)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    chosen: list[str] = []
    for name in names:
        if len(chosen) + len(groups[name]) <= size:
            chosen += groups[name]
        if len(chosen) == size:
            return sorted(chosen)
    raise ValueError(f"{len(synsets)} synsets cannot give {size} held-out ids in whole name groups")


def heldout_ids(path: Path | str = HELDOUT_FILE) -> list[str]:
    """The held-out synset ids of `path` (one per line), in file order."""
    return Path(path).read_text().split()


def split(synsets: Sequence[Synset], heldout: Optional[Iterable[str]] = None) -> tuple[list[Synset], list[Synset]]:
    """(train, held-out) synsets, each in the order given; held-out ids default to `heldout_ids()`.
    DataError if a held-out id is not among the synsets (a WordNet other than 3.0)."""
    ids = set(heldout_ids() if heldout is None else heldout)
    missing = ids - {s.id for s in synsets}
    if missing:
        raise DataError(f"{len(missing)} held-out synset id(s) of {HELDOUT_FILE.name} are not in this WordNet "
                        f"(e.g. {min(missing)}); it was drawn from WordNet 3.0: {INSTALL}")
    return [s for s in synsets if s.id not in ids], [s for s in synsets if s.id in ids]
