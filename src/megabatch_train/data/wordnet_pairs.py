"""`--data wordnet`: WordNet 3.0's synsets as text-text pairs, a definition (the query, on the side
where images go) and its synset's name (the caption); see wordnet.py for how both are read and
normalised, and for the committed held-out split of 5,000 synsets.

Queries are yielded as token ids, (n, context_length) int64, made by the run's own tokenizer, which
build.py hands over with `set_tokenizer` once it exists (the built-in word tokenizer is made from this
stream's vocabulary, so the stream comes first). Why tokens and not strings: GradCache slices and
moves the query batch as a tensor, DDP/FSDP, the health probe and the evaluation all encode it as
they encode images, and the training loop stays as it is.

Order: every training synset once per epoch, in a permutation drawn from (seed, epoch): sample i of
global batch `step` is position step * B + i of that sequence, so a run resumes from its step alone.
Two synsets with one name are one caption, so caption-hash positives (`--positives caption`, the
default) make them positives of each other when a batch holds both.

Subsets (small runs, tests): `--wordnet-synsets N` trains on N training synsets and `--eval-size K`
evaluates on K held-out ones, each drawn in whole name groups (`wordnet.draw_heldout`, seed 0), so a
name is never split between the subset and the rest.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from torch import Tensor

from . import wordnet
from .tokenizer import words
from .types import EvalData

SUBSET_SEED = 0


def _subset(synsets: list[wordnet.Synset], size: int) -> list[wordnet.Synset]:
    if not size or size >= len(synsets):
        return synsets
    keep = set(wordnet.draw_heldout(synsets, size, SUBSET_SEED))
    return [s for s in synsets if s.id in keep]


class WordNetPairs:
    """Training stream and held-out set of (definition, name) pairs.

    Args:
        seed: the epochs' permutations are drawn from (seed, epoch).
        synsets: train on this many training synsets (0: all 112,659).
        eval_size: evaluate on this many held-out synsets (0: all 5,000).
        root: the folder of WordNet's data files (default wordnet.DEFAULT_ROOT, read when called);
            missing files raise wordnet.WordNetUnavailable (a DataError naming the install command).
    """

    name = "wordnet"

    def __init__(self, seed: int = 0, synsets: int = 0, eval_size: int = 0, root: Optional[str] = None):
        every = wordnet.load_synsets(wordnet.DEFAULT_ROOT if root is None else root)
        train, held = wordnet.split(every)
        self.train, self.held = _subset(train, synsets), _subset(held, eval_size)
        self.seed = seed
        self.vocabulary = sorted({w for s in self.train for text in (s.name, s.definition) for w in words(text)})
        self._tokenize: Optional[Callable[[list[str]], Tensor]] = None
        self._orders: dict[int, np.ndarray] = {}

    def set_tokenizer(self, tokenize: Callable[[list[str]], Tensor]) -> None:
        """The run's tokenizer (list[str] -> (n, L) int64), which turns the definitions into the query batch."""
        self._tokenize = tokenize

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.train))
        return self._orders[epoch]

    def _tokens(self, texts: list[str]) -> Tensor:
        if self._tokenize is None:
            raise RuntimeError("WordNetPairs yields token ids: call set_tokenizer(the run's tokenizer) first")
        return self._tokenize(texts)

    def batch(self, step: int, size: int, start: int, stop: int) -> tuple[Tensor, list[str]]:
        """Pairs [start, stop) of global batch `step` (of `size`): definitions as (n, L) token ids, and names."""
        n = len(self.train)
        positions = step * size + np.arange(start, stop)
        chosen = [self.train[int(self._order(int(p // n))[p % n])] for p in positions]
        return self._tokens([s.definition for s in chosen]), [s.name for s in chosen]

    def eval_set(self) -> EvalData:
        definitions = [s.definition for s in self.held]
        names = [s.name for s in self.held]
        about = (f"{len(self.held):,} held-out WordNet synsets ({len(set(names)):,} distinct names, the gallery; "
                 "a synset of the same name counts as a hit)")
        return EvalData(self._tokens(definitions), names, [], about, queries=definitions,
                        sides=("definition", "name"))
