"""`megabatch train` on users' own files (csv/tsv tables and webdataset shards).

Contract checked here:
- open_clip's flags name the columns (--csv-img-key, --csv-caption-key, --csv-separator inferred
  from the extension unless given, --csv-id-key; --wds-id-key for shards); a file without a header
  takes 0-based positions; per-pair ids come back as int64 (integers as written, other text hashed).
- Every unusable input is a usage error: exit status 2, no traceback, a message naming the file,
  the columns found and the flag to use (missing file, missing column, empty table, header-less
  file read by name, position past the row, mixed names/positions, bad separator, csv flags
  without csv data, a held-out split that leaves no training rows or holds no pair, no shard, a
  folder given as a table or shard, a file that is not a tar, data without one caption).
- A table none of whose images exists (paths written relative to the working directory) is one
  usage line naming where the first image was looked for and the path rule, before any training,
  with or without DataLoader workers and --eval-split 0; a worker's share with no usable pair in a
  whole epoch is one usage line from inside the DataLoader worker too, naming the first item
  skipped, its resolved path and the rule. A table with only some images missing trains.
- Without --eval-data a deterministic split is held out (never in the training stream, nor in the
  tokenizer's training captions) and evaluated, the summary says so; --eval-size cuts are stated;
  the outputs listed are the outputs written.
- Captions go through a BPE (tokenizers) learnt on training captions only, saved in the
  checkpoint, with a context fitted to >= 99% of them; truncation is counted.
- The DataLoader stream (workers > 0) is deterministic for a seed and worker count, covers each
  row once per epoch, and a resumed stream continues exactly (mid-chunk, across an epoch wrap,
  tar shards mid-shard) without decoding consumed pairs; a resumed run with workers reproduces
  the uninterrupted run's metrics, and two runs with the same seed and workers are identical.
- Summary percentages have >= 2 significant digits; curves.png is drawn with one evaluation.
- A bad row met in every epoch by workers reading ahead is said once, by the training process, and
  counted at the end of the run ("skipped 1 bad row(s) N times"); the held-out share is the rows
  held out over the table's rows ("1 pair ... (20.0% of its 5 rows)"); fewer distinct pairs than
  the global batch are warned about.
"""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megabatch_train.cli import main
from megabatch_train.config.sections import from_preset
from megabatch_train.data.files import stream as filestream
from megabatch_train.data.files.pairs import stable_id
from megabatch_train.data.files.stream import FileOptions, FileStream
from megabatch_train.data.tokenizer import BpeTokenizer, fit_context, truncation
from megabatch_train.evaluation.report import percent
from megabatch_train.run.identity import resume_config
from megabatch_train.run.loop import train

WORDS = "red green blue small large round square cat dog bird tree house boat".split()


def make_table(folder: Path, n: int, name: str = "pairs.tsv", sep: str = "\t", header: bool = True) -> Path:
    """n 8x8 PNGs and a table with columns uid, caption, path (a custom header, not open_clip's)."""
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = [sep.join(["uid", "caption", "path"])] if header else []
    for i in range(n):
        Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(folder / "img" / f"{i}.png")
        caption = " ".join(rng.choice(WORDS, 3)) + f" number {i}"
        lines.append(sep.join([str(1000 + i), caption, f"img/{i}.png"]))
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(args)
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


TINY = ["--preset", "tiny", "--steps", "2", "--batch-size", "16", "--micro-batch-size", "16", "--no-progress"]


# --- usage errors ----------------------------------------------------------------------------


def test_error_paths_exit_2_with_file_columns_and_flag(tmp_path, capsys):
    table = make_table(tmp_path, 12)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header_only.csv").write_text("filepath,title\n")
    (tmp_path / "noheader.csv").write_text("img/0.png,a cat\nimg/1.png,a dog\n")
    (tmp_path / "blank.csv").write_text("filepath,title\nimg/0.png,\nimg/1.png, \n")
    (tmp_path / "text.tar").write_text("not a tar file\n")
    shard(tmp_path / "five.tar", range(5))  # no key of these hashes below 0.02
    run = ["--output", str(tmp_path / "run")] + TINY
    cases = [
        (["--data", f"csv:{tmp_path / 'nope.tsv'}"], ["nope.tsv", "does not exist"]),
        (["--data", f"csv:{table}"], ["pairs.tsv", "'filepath'", "'title'", "['uid', 'caption', 'path']",
                                      "--csv-img-key", "--csv-caption-key"]),
        (["--data", f"csv:{table}", "--csv-img-key", "path", "--csv-caption-key", "text"],
         ["pairs.tsv", "--csv-caption-key 'text'", "['uid', 'caption', 'path']"]),
        (["--data", f"csv:{table}", "--csv-img-key", "path", "--csv-caption-key", "caption", "--csv-id-key", "key"],
         ["--csv-id-key 'key'", "['uid', 'caption', 'path']"]),
        (["--data", f"csv:{table}", "--csv-img-key", "path", "--csv-caption-key", "caption", "--csv-separator", ","],
         ["pairs.tsv", "one column only", "--csv-separator"]),
        (["--data", f"csv:{tmp_path / 'empty.csv'}"], ["empty.csv", "empty"]),
        (["--data", f"csv:{tmp_path / 'header_only.csv'}"], ["header_only.csv", "no rows", "['filepath', 'title']"]),
        (["--data", f"csv:{tmp_path / 'noheader.csv'}"], ["noheader.csv", "['img/0.png', 'a cat']", "0-based"]),
        (["--data", f"csv:{tmp_path / 'noheader.csv'}", "--csv-img-key", "0", "--csv-caption-key", "2"],
         ["noheader.csv", "position 2", "2 column(s)", "--csv-caption-key"]),
        (["--data", f"csv:{table}", "--csv-img-key", "2", "--csv-caption-key", "caption"],
         ["header names or all 0-based"]),
        (["--data", f"csv:{table}", "--csv-separator", ";;"], ["--csv-separator", "one character"]),
        (["--csv-img-key", "path"], ["--csv-img-key", "csv"]),
        (["--data", f"csv:{table}", "--wds-id-key", "cls"], ["--wds-id-key", "wds"]),
        (["--data", f"csv:{table}", "--csv-img-key", "path", "--csv-caption-key", "caption", "--eval-split", "12"],
         ["pairs.tsv", "leaves 0", "--eval-split"]),
        (["--data", f"csv:{table}", "--eval-split", "1.5"], ["--eval-split", "fraction"]),
        (["--data", f"csv:{table}", "--workers", "-1"], ["--workers"]),
        (["--data", f"wds:{tmp_path / 'shards-{0..3}.tar'}"], ["no shard", "shards-0.tar"]),
        (["--data", f"wds:{tmp_path / '*.tgz'}"], ["no shard matches"]),
        (["--data", f"wds:{tmp_path / 'five.tar'}", "--batch-size", "4", "--micro-batch-size", "4"],
         ["five.tar", "no usable", "--eval-split"]),
        (["--data", f"wds:{tmp_path / 'five.tar'}", "--eval-split", "3"], ["--eval-split 3", "fraction"]),
        (["--data", f"csv:{tmp_path}"], [f"{str(tmp_path)!r} is a folder, not a table", "blank.csv",
                                         "give the table file's path"]),
        (["--data", f"wds:{tmp_path}"], [f"{str(tmp_path)!r} is a folder, not a tar file", "*.tar'",
                                         "2 .tar file(s) there"]),
        (["--data", f"wds:{tmp_path / 'text.tar'}"], ["text.tar: not a tar file", "no training sample",
                                                      "has a caption"]),
        (["--data", f"csv:{tmp_path / 'blank.csv'}", "--eval-split", "0"], ["blank.csv", "none of its 2 training rows "
                                                                             "has a caption", "--csv-caption-key"]),
        (["--context-length", "0"], ["--context-length 0", "csv"]),
    ]
    for args, words in cases:
        code, out, err = cli(run + args, capsys)
        assert code == 2, (args, code, err)
        assert "Traceback" not in err and "error:" in err, (args, err)
        for word in words:
            assert word in err, (args, word, err)


# --- a whole run through the flags -----------------------------------------------------------


def test_csv_custom_header_held_out_split_end_to_end(tmp_path, capsys):
    table = make_table(tmp_path, 60, name="pairs.txt", sep=";")
    out = tmp_path / "run"
    code, printed, err = cli(["--data", f"csv:{table}", "--csv-img-key", "path", "--csv-caption-key", "caption",
                              "--csv-id-key", "uid", "--csv-separator", ";", "--eval-split", "0.2", "--workers",
                              "1", "--output", str(out), "--log-every", "1"] + TINY, capsys)
    assert code == 0, err
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n_images"] == 12 and "held out of" in ev["eval_set"] and "never trained on" in ev["eval_set"]
    assert "held-out eval at step 2: 12 pairs held out of" in printed and "20.0% of its 60 rows" in printed
    assert "byte-level BPE" in printed and "evaluation captions truncated: 0 of 12" in printed
    listed = printed.splitlines()[-1]
    assert listed.startswith("outputs:")
    for name in ("metrics.jsonl", "eval.json", "curves.png", "config.json", "checkpoints/"):
        assert name in listed and (out / name.rstrip("/")).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["csv_img_key"] == "path" and config["csv_separator"] == ";" and config["model"]["context_length"] >= 4
    ckpt = torch.load(next((out / "checkpoints").glob("step_*.pt")), weights_only=False)
    assert ckpt["tokenizer"]["kind"] == "bpe" and ckpt["data"][0]["consumed"] == 32

    # The split: disjoint, deterministic, and the tokenizer never saw a held-out caption.
    opts = FileOptions("path", "caption", "uid", ";", eval_split=0.2, workers=0)
    stream = FileStream("csv", str(table), 8, options=opts)
    assert set(stream.eval_rows).isdisjoint(stream.pairs._order) and len(stream.eval_rows) == 12
    assert stream.eval_rows == FileStream("csv", str(table), 8, seed=5, options=opts).eval_rows
    held = set(stream.table.captions(stream.eval_rows))
    assert held.isdisjoint(stream.training_captions()) and len(stream.training_captions()) == 48
    images, captions, ids = stream.batch_with_ids(0, 48, 0, 48)
    assert images.shape == (48, 3, 8, 8) and images.dtype == torch.float32 and held.isdisjoint(captions)
    numbers = [int(c.rsplit(" ", 1)[1]) for c in captions]
    assert ids.dtype == torch.int64 and ids.tolist() == [1000 + i for i in numbers]
    evald = stream.eval_set()
    assert sorted(evald.ids.tolist()) == sorted(1000 + r for r in stream.eval_rows)

    # --eval-size cuts, and says so; header-less positions read the same pairs.
    cut = filestream.load_eval("csv", str(table), 8, FileOptions("path", "caption", None, ";", eval_size=5,
                                                                 workers=0), "x", table=stream.table,
                               rows=stream.eval_rows)
    assert len(cut.captions) == 5 and "cut to the first 5 of 12 by --eval-size" in cut.description
    bare = make_table(tmp_path / "bare", 10, name="bare.csv", sep=",", header=False)
    pos = FileStream("csv", str(bare), 8, options=FileOptions(2, 1, 0, eval_split=0, workers=0))
    assert pos.table.header is None and len(pos.training_captions()) == 10
    assert pos.batch_with_ids(0, 3, 0, 3)[2].tolist()[0] >= 1000



def test_tiny_table_and_a_missing_image_said_once_with_counts(tmp_path, capsys):
    # 5 rows, the default --eval-split 0.02 holds out 1 (20%, not 2%); one training row's image is missing.
    table = make_table(tmp_path, 5)
    opts = FileOptions("path", "caption", workers=0)
    train_rows = FileStream("csv", str(table), 8, options=opts).pairs._order
    (tmp_path / "img" / f"{train_rows[1]}.png").unlink()
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, printed, err = cli(["--data", f"csv:{table}", "--csv-img-key", "path", "--csv-caption-key", "caption",
                                  "--output", str(out), "--log-every", "1"] + TINY, capsys)
    assert code == 0, err
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert "1 pair held out of" in printed and "(20.0% of its 5 rows)" in printed
    assert sum("the training data holds 4 distinct pairs, fewer than the global batch 16: each batch repeats pairs"
               in m for m in said) == 1, said
    skipping = [m for m in said if "skipping" in m or "skipped" in m]
    assert len(skipping) == 1 and f"row {train_rows[1] + 1} (img/{train_rows[1]}.png): missing_image" in skipping[0]
    assert f"(No such file or directory: {tmp_path / 'img' / f'{train_rows[1]}.png'})" in skipping[0]
    times = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["data_skipped"]
    assert times >= 5 and f"pairs.tsv: skipped 1 bad row(s) {times} times" in err, err
    assert f"row {train_rows[1] + 1} (img/{train_rows[1]}.png): missing_image, {times} times" in err

@pytest.mark.filterwarnings("ignore:.*fewer than the global batch")
def test_no_image_found_is_one_usage_line_naming_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    """Finding: image paths written relative to the working directory (data/img/0.png inside
    data/pairs.csv) blamed the evaluation split and advised --eval-split 0, which ended in a
    traceback from the stream (exit 1, "Caught RuntimeError in DataLoader worker process 0" with
    workers); the path looked for was never shown."""
    monkeypatch.chdir(tmp_path)
    table = make_table(tmp_path / "data", 6)
    table.write_text(table.read_text().replace("\timg/", "\tdata/img/"))  # relative to the working directory
    looked = tmp_path / "data" / "data" / "img"
    for extra in ([], ["--eval-split", "0"], ["--workers", "0"], ["--workers", "0", "--eval-split", "0"]):
        code, _, err = cli(["--data", "csv:data/pairs.tsv", "--csv-img-key", "path", "--csv-caption-key", "caption",
                            "--output", "run", *extra] + TINY, capsys)
        assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 2, (extra, err)  # + the --help line
        assert (f"data/pairs.tsv: none of the images its 6 row(s) name exists; the first, 'data/img/0.png' (row 1), "
                f"was looked for at {looked / '0.png'}. Image paths are taken relative to the table's folder "
                f"{tmp_path / 'data'}, or as written when absolute; 'data/img/0.png' does exist relative to the "
                f"working directory {tmp_path}") in err, (extra, err)
        assert "--eval-split" not in err and not (tmp_path / "run" / "metrics.jsonl").exists()

    # Images there for one DataLoader worker's rows only: the other's share has no usable pair in a whole
    # epoch, said from inside its worker process as one usage line (the rows' images exist: no up-front error).
    table = make_table(tmp_path, 6)
    opts = FileOptions("path", "caption", eval_split=0, workers=2)
    lost = sorted(FileStream("csv", str(table), 8, options=opts).pairs._mine(0, 0, 2))
    for r in lost:
        (tmp_path / "img" / f"{r}.png").unlink()
    code, _, err = cli(["--data", f"csv:{table}", "--csv-img-key", "path", "--csv-caption-key", "caption",
                        "--eval-split", "0", "--workers", "2", "--output", "run2"] + TINY, capsys)
    assert code == 2 and "Traceback" not in err and "DataLoader worker" not in err, err
    line = next(ln for ln in err.splitlines() if "error:" in ln)
    assert (f"pairs.tsv: no usable item in a whole epoch of this worker's share (skipped {{'missing_image': "
            f"{len(lost)}}}); the first: row ") in line
    assert (f"missing_image (No such file or directory: {tmp_path / 'img'}/" in line and "; image paths are taken "
            f"relative to the table's folder {tmp_path}, or as written when absolute" in line), line


def test_run_resume_and_determinism_with_workers(tmp_path):
    table = make_table(tmp_path, 80)
    base = dict(data=f"csv:{table}", csv_img_key="path", csv_caption_key="caption", batch_size=24,
                micro_batch_size=12, log_every=1, progress=False, workers=2, eval_split=0.1, steps=6)

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    a = train(from_preset("tiny", output=str(tmp_path / "a"), **base))
    b = train(from_preset("tiny", output=str(tmp_path / "b"), **base))
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and a["i2t_r1"] == b["i2t_r1"]
    assert {k: a[k] for k in a if k != "eval_set"} == {k: b[k] for k in b if k != "eval_set"}
    train(from_preset("tiny", output=str(tmp_path / "c"), **{**base, "steps": 3}))  # 72 of 72 rows: a wrap next
    c = train(resume_config(str(tmp_path / "c"), {"steps": 6}))
    assert losses(tmp_path / "c") == losses(tmp_path / "a") and c["i2t_r1"] == a["i2t_r1"]
    with pytest.raises(ValueError, match="--workers"):
        resume_config(str(tmp_path / "c"), {"workers": 1})


# --- the stream ------------------------------------------------------------------------------


def take(stream: FileStream, n: int) -> list[str]:
    return stream.batch(0, n, 0, n)[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly_without_decoding_consumed_pairs(tmp_path, monkeypatch, workers):
    table = make_table(tmp_path, 23)
    monkeypatch.setattr(filestream, "CHUNK", 5)  # chunks end mid-batch; 2 epochs in 40 pairs
    opts = FileOptions("path", "caption", eval_split=0, workers=workers)
    whole = take(FileStream("csv", str(table), 8, seed=3, options=opts), 40)
    every = Counter(FileStream("csv", str(table), 8, options=opts).table.captions())
    if workers == 0:
        assert Counter(whole[:23]) == every  # an epoch is a permutation
    else:  # workers interleave chunks, each going through its own rows epoch by epoch
        assert set(whole) == set(every) and set(Counter(whole).values()) <= {1, 2}
    assert whole == take(FileStream("csv", str(table), 8, seed=3, options=opts), 40)  # deterministic
    for cut in (7, 10, 21, 23, 31):
        first = FileStream("csv", str(table), 8, seed=3, options=opts)
        got = take(first, cut)
        state = first.state_dict()
        second = FileStream("csv", str(table), 8, seed=3, options=opts)
        second.load_state_dict(state)
        decoded = []
        real = second.pairs._decode
        monkeypatch.setattr(second.pairs, "_decode", lambda data, where: decoded.append(data) or real(data, where))
        got += take(second, 40 - cut)
        assert got == whole, cut
        if workers == 0:  # (workers decode in their own processes)
            assert len(decoded) <= 40 - cut + filestream.CHUNK  # the rest of a chunk at most, never the past
    if workers:  # another worker count is another (valid) order
        other = take(FileStream("csv", str(table), 8, seed=3, options=FileOptions("path", "caption", eval_split=0,
                                                                                   workers=1)), 40)
        assert Counter(other[:23]) == every and other != whole



def test_stream_reports_bad_rows_from_the_training_process_once(tmp_path):
    # The workers read epochs ahead (4 chunks of 128 pairs each) and meet the bad row in every one of them:
    # the training process says it once, when a pair after it is used, and counts it.
    table = make_table(tmp_path, 9)
    (tmp_path / "img" / "4.png").unlink()
    stream = FileStream("csv", str(table), 8, options=FileOptions("path", "caption", eval_split=0, workers=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(take(stream, 80)) == 80  # 16+ epochs of one worker's 4 or 5 rows
    said = [str(w.message) for w in caught]
    assert said == [f"pairs.tsv: skipping row 5 (img/4.png): missing_image (No such file or directory: {tmp_path}/img/"
                    "4.png); it is skipped in every epoch, counted at the end of the run"], said
    assert stream.skipped >= 5 and stream.skip_summary() == (
        f"pairs.tsv: skipped 1 bad row(s) {stream.skipped} times in all: row 5 (img/4.png): missing_image, "
        f"{stream.skipped} times")

def shard(path: Path, keys: range, with_id: bool = True) -> None:
    rng = np.random.default_rng(keys.start)
    with tarfile.open(path, "w") as tar:
        for k in keys:
            buf = io.BytesIO()
            Image.fromarray((rng.random((9, 9, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
            parts = {"png": buf.getvalue(), "txt": f"sample {k}".encode()}
            if with_id:
                parts["cls"] = (str(k % 7) if k % 2 else f"label-{k}").encode()
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{k:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shards_held_out_by_key_ids_and_resume_mid_shard(tmp_path, monkeypatch):
    for s in range(3):
        shard(tmp_path / f"s-{s}.tar", range(40 * s, 40 * s + 40))
    pattern = str(tmp_path / "s-{0..2}.tar")
    monkeypatch.setattr(filestream, "CHUNK", 7)
    opts = FileOptions(wds_id="cls", eval_split=0.25, workers=2)
    stream = FileStream("wds", pattern, 8, options=opts)
    held = stream.eval_set()
    train_caps = take(stream, 200)
    assert 10 < len(held.captions) < 60 and set(held.captions).isdisjoint(train_caps)
    assert set(train_caps) | set(held.captions) == {f"sample {k}" for k in range(120)}  # all others trained on
    assert set(held.captions).isdisjoint(stream.training_captions())
    k = int(held.captions[0].split()[1])
    assert held.ids[0] == (k % 7 if k % 2 else stable_id(f"label-{k}"))
    first = FileStream("wds", pattern, 8, options=opts)
    got = take(first, 45)
    again = FileStream("wds", pattern, 8, options=opts)
    again.load_state_dict(first.state_dict())
    assert got + take(again, 155) == train_caps
    assert "key hashes below 0.25" in held.description


# --- tokenizer and reports -------------------------------------------------------------------


def test_bpe_tokenizer_fit_truncation_and_state():
    captions = [f"a {w} photo of number {i}" for i in range(200) for w in ("cat", "dog")] + ["word " * 60]
    tok = BpeTokenizer.train(captions)
    lengths = tok.lengths(captions)
    assert np.mean(np.array(lengths) <= tok.context_length) >= 0.99 and tok.context_length < 20
    assert tok.fit == {"captions": 401, "truncated": 1, "fitted": True}
    ids = tok(["A cat photo", "zebra ünïcode"])
    assert ids.shape == (2, tok.context_length) and ids[:, 0].eq(1).all() and ids.ge(0).all()
    assert not ids.eq(2).any()  # byte-level: no <unk>
    again = BpeTokenizer.from_state_dict(tok.state_dict())
    assert torch.equal(again(captions[:5]), tok(captions[:5])) and again.fit == tok.fit
    t = truncation(tok, ["word " * 60 + "a", "word " * 60 + "b", "a cat"])
    assert t == {"captions": 3, "truncated": 2, "distinct": 3, "merged": 1}
    assert fit_context([3] * 99 + [50]) == 3 and fit_context([100] * 10) == 77


def test_percentages_and_one_evaluation_plot(tmp_path):
    assert [percent(x) for x in (0.00055, 0.0027, 0.054, 0.813, 1.0, 0.0)] == \
        ["0.055%", "0.27%", "5.4%", "81.3%", "100.0%", "0.0%"]
    from megabatch_train.evaluation.plots import plot_curves

    metrics = [{"step": s, "loss": 3 - s / 100, "logit_scale": 14 + s / 1000, "logit_bias": -10 + s * 1e-5}
               for s in range(5, 85, 5)]
    evals = [{"step": 80, "i2t_r1": 0.81, "t2i_r1": 0.79, "chance": {"i2t_r1": 0.00055}, "n_images": 1826}]
    plot_curves(metrics, evals, tmp_path / "c.png", title="one evaluation")
    plot_curves(metrics[:1], [], tmp_path / "none.png", title="no evaluation")
    assert (tmp_path / "c.png").stat().st_size > 10_000 and (tmp_path / "none.png").exists()
