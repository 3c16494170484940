"""megabatch_train.wordnet: WordNet 3.0's data files as (id, name, definition) synsets and a fixed held-out split.

Hand-written data lines in a temporary folder check the parser (hex word counts, adjective markers, glosses
with examples, a malformed line skipped and counted with one warning); the installed files (Debian's
wordnet-base, which `make debs` installs in CI) check the counts measured in the module's docstring and the
committed held-out file. ~2 s in all (parsing the real files twice takes most of it).
"""
from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest

from megabatch_train.data import wordnet as wn
from megabatch_train.data.types import DataError

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n  2 Princeton University\n"
NOUNS = [
    # 0a = 10 words (hex), underscores, a repeated lemma once lower-cased ("A", "a")
    "00001740 03 n 0a " + " ".join(f"w_{i} 0" for i in range(8)) + " A 0 a 0 000 | ten words here  ",
    "00002000 03 n 01 bank 0 000 | sloping land; \"they pulled the canoe up on the bank\"; \"he sat on the bank\"  ",
    "00003000 03 n zz bank 0 000 | a malformed word count  ",
    "00004000 03 n 01 Bank 1 000 | a financial institution;\"he cashed a check at the bank\"  ",
]
VERBS = ["00005000 29 v 01 run 0 001 @ 00006000 v 0000 01 + 02 00 | move fast by using one's feet; \"Don't run\"  "]
ADJS = [
    "00007000 00 a 02 able(a) 0 capable(p) 0 000 | having the necessary means  ",
    "00008000 00 s 02 up(ip) 0 Up_to_Date 0 001 & 00007000 a 0000 | current: \"an up-to-date list\"  ",
]
ADVS = ["00009000 02 r 1f " + " ".join(f"a{i} 0" for i in range(31)) + " 000 | in many ways  "]


def write_wordnet(root: Path, nouns=NOUNS, verbs=VERBS, adjs=ADJS, advs=ADVS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in {"noun": nouns, "verb": verbs, "adj": adjs, "adv": advs}.items():
        (root / f"data.{name}").write_text(HEADER + "".join(line + "\n" for line in lines))
    return root


def test_hand_written_lines_parse_and_a_malformed_one_is_counted(tmp_path):
    root = write_wordnet(tmp_path / "wn")
    with pytest.warns(UserWarning) as caught:
        synsets = wn.load_synsets(root)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped 1 malformed data line(s)" in message and f"{root / 'data.noun'}:5:" in message
    assert "'zz' is not two hex digits" in message
    by_id = {s.id: s for s in synsets}
    assert list(by_id) == ["n00001740", "n00002000", "n00004000", "v00005000", "a00007000", "s00008000",
                           "r00009000"]
    assert by_id["n00001740"].name == ", ".join(f"w {i}" for i in range(8)) + ", a"  # 0a words, "A" == "a"
    assert by_id["n00002000"] == wn.Synset("n00002000", "bank", "sloping land")  # examples dropped
    assert by_id["n00004000"].name == "bank"  # lower-cased: one name with n00002000 (caption positives)
    assert by_id["n00004000"].definition == "a financial institution"  # ';"' without a space
    assert by_id["v00005000"].definition == "move fast by using one's feet"  # verb frames before the bar
    assert by_id["a00007000"].name == "able, capable"  # (a), (p) removed
    assert by_id["s00008000"] == wn.Synset("s00008000", "up, up to date", 'current: "an up-to-date list"')
    assert by_id["r00009000"].name == ", ".join(f"a{i}" for i in range(31))  # 1f = 31 words


@pytest.mark.parametrize("line, why", [
    ("00001000 03 n 01 dog 0 000 no bar", "no ' | '"),
    ("0001000 03 n 01 dog 0 000 | x", "not 8 decimal digits"),
    ("00001000 03 v 01 dog 0 000 | x", "ss_type 'v' is not one of n"),
    ("00001000 03 n 03 dog 0 cat 0 000 | x", "but only 2 words"),
    ("00001000 03 n 00 000 | x", "above 00"),
    ("00001000 03 n 01 dog 0 | x", "only 1 words"),  # p_cnt missing
    ("00001000 03 n 01 dog 0 x0 | x", "pointer count 'x0' after 1 words"),
    ("00001000 03 n 01 (a) 0 000 | x", "an empty word"),
    ('00001000 03 n 01 dog 0 000 | ; "only an example"', "an empty definition"),
])
def test_malformed_lines_say_what_is_wrong(line, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        wn.parse_line(line, "n")


def test_repeated_ids_and_undecodable_lines_are_skipped(tmp_path):
    root = write_wordnet(tmp_path / "wn", nouns=[NOUNS[1], NOUNS[1]])
    with open(root / "data.verb", "ab") as f:
        f.write(b"00005100 29 v 01 r\xffn 0 000 | not UTF-8\n")
    with pytest.warns(UserWarning, match=r"skipped 2 malformed .*data.noun:4: id n00002000 repeated"):
        synsets = wn.load_synsets(root)
    assert [s.id for s in synsets] == ["n00002000", "v00005000", "a00007000", "s00008000", "r00009000"]


def test_missing_wordnet_names_the_install_command(tmp_path):
    with pytest.raises(wn.WordNetUnavailable, match=re.escape(wn.INSTALL)) as e:
        wn.load_synsets(tmp_path)
    assert isinstance(e.value, DataError) and "data.noun" in str(e.value)
    assert wn.INSTALL == "sudo apt-get install --no-install-recommends wordnet-base"


def test_split_and_draw_keep_name_groups_whole(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        synsets = wn.load_synsets(write_wordnet(tmp_path / "wn"))
    drawn = wn.draw_heldout(synsets, size=2, seed=0)
    train, held = wn.split(synsets, drawn)
    assert [s.id for s in held] == drawn and len(train) == len(synsets) - 2
    assert not {s.name for s in held} & {s.name for s in train}
    assert wn.draw_heldout(synsets[::-1], size=2, seed=0) == drawn  # independent of the order
    with pytest.raises(ValueError, match="cannot give 8 held-out ids"):
        wn.draw_heldout(synsets, size=8)
    with pytest.raises(DataError, match="n99999999"):
        wn.split(synsets, ["n99999999"])


def test_the_heldout_file_is_packaged():
    ids = wn.heldout_ids()
    assert len(ids) == len(set(ids)) == wn.HELDOUT_SIZE == 5000
    assert all(re.fullmatch(r"[nvasr]\d{8}", i) for i in ids) and ids == sorted(ids)
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert wn.HELDOUT_FILE.name in pyproject["tool"]["setuptools"]["package-data"]["megabatch_train.data"]


@pytest.mark.skipif(not (wn.DEFAULT_ROOT / "data.noun").exists(), reason=f"WordNet 3.0 missing: {wn.INSTALL}")
def test_installed_wordnet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no malformed line in WordNet 3.0
        synsets = wn.load_synsets()
    assert len(synsets) == 117659
    counts: dict[str, int] = {}
    for s in synsets:
        counts[s.id[0]] = counts.get(s.id[0], 0) + 1
    assert counts == {"n": 82115, "v": 13767, "a": 7463, "s": 10693, "r": 3621}
    by_id = {s.id: s for s in synsets}
    assert by_id["n02084071"].name == "dog, domestic dog, canis familiaris"
    assert by_id["n09213565"] == wn.Synset("n09213565", "bank", "sloping land (especially the slope beside a "
                                           "body of water)")
    names: dict[str, int] = {}
    for s in synsets:
        names[s.name] = names.get(s.name, 0) + 1
    assert len(names) == 102560 and sum(n for n in names.values() if n > 1) == 23867

    assert wn.heldout_ids() == wn.draw_heldout(synsets)  # the committed file is the stated draw
    train, held = wn.split(synsets)
    assert len(held) == 5000 and len(train) == 117659 - 5000
    assert not {s.name for s in held} & {s.name for s in train}
