"""megabatch_train.files: CsvPairs (CSV/TSV of image path + caption) and TarShards (webdataset tar
shards) yield (PIL RGB image or transform(image), caption) for every good item, in order; skip and
count by reason (with a warning) a missing image file, a corrupt or truncated image, an empty or
non-UTF-8 caption, a malformed row, and a shard that is missing, not a tar or cut short (mid-data,
at a member boundary, mid-header), keeping the samples read before the damage; split items over
ranks then DataLoader workers so that none is yielded twice and none is lost (also shuffled), with
counts summed over workers; `repeat` streams epochs without spinning on an empty share and fails
loudly when a whole epoch has nothing usable; shard patterns expand ({000..009}, {a,b}, globs);
with an id column the items are (image, caption, int64 id): integers as written, other text by a
stable hash, a blank id skipped and counted; a repeating stream warns about a bad row once (and
summarises once), not in every epoch. Tables and images as tools write them read right: a UTF-8
byte-order mark, UTF-16, CR LF line ends, quoted captions holding the separator, quotes and a line
break; CMYK JPEGs, 16-bit greys (scaled, not clipped), palettes with transparency, L, LA and RGBA
(transparency over white) come out RGB with the colours they show.
"""
from __future__ import annotations

import io
import itertools
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from megabatch_train.data.files.pairs import REASONS, parse_id, stable_id
from megabatch_train.data.files.shards import TarShards, expand_urls
from megabatch_train.data.files.tables import CsvPairs
from megabatch_train.data.types import DataError


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format=fmt)
    return buf.getvalue()


def color_of(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 10 * i % 256, 7 * i % 256)


def pixel(image: Image.Image) -> tuple[int, int, int]:
    return image.getpixel((0, 0))


def counts(**nonzero: int) -> dict[str, int]:
    return {r: nonzero.get(r, 0) for r in REASONS}


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).reshape(-1, 3)


# --- CSV / TSV ---------------------------------------------------------------------------------


def write_table(tmp: Path, name: str, lines: list[str]) -> Path:
    path = tmp / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bad_table(tmp: Path) -> Path:
    (tmp / "img").mkdir()
    for i in range(4):
        (tmp / "img" / f"good{i}.png").write_bytes(image_bytes(color_of(i)))
    (tmp / "img" / "garbage.jpg").write_bytes(b"this is not an image")
    jpeg = image_bytes((1, 2, 3), "JPEG")
    (tmp / "img" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp / "img" / "no_caption.png").write_bytes(image_bytes((9, 9, 9)))
    return write_table(
        tmp,
        "pairs.csv",
        [
            "filepath,title",
            "img/good0.png,a red thing",
            "img/missing.png,never there",
            "img/good1.png,\"a caption, with a comma\"",
            "img/garbage.jpg,garbage bytes",
            "img/cut.jpg,a truncated jpeg",
            "img/no_caption.png,   ",
            "img/good2.png",
            "",
            "img/good3.png,last one",
        ],
    )


def test_csv_yields_good_rows_and_counts_bad_ones(tmp_path: Path) -> None:
    pairs = CsvPairs(bad_table(tmp_path))
    assert pairs.num_rows == 8
    with pytest.warns(UserWarning) as caught:
        items = list(pairs)
    assert sum("skipping" in str(w.message) for w in caught) == 5  # one warning per bad item
    assert [c for _, c in items] == ["a red thing", "a caption, with a comma", "last one"]
    assert [pixel(im) for im, _ in items] == [color_of(0), color_of(1), color_of(3)]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im, _ in items)
    assert pairs.counts == counts(missing_image=1, corrupt_image=2, empty_caption=1, bad_row=1)
    assert pairs.skipped == 5
    assert any("skipped 5 bad item(s)" in str(w.message) for w in caught)  # the end-of-epoch summary



def test_tables_and_images_as_tools_write_them(tmp_path: Path) -> None:
    """Finding: a spreadsheet's "CSV UTF-8" (a byte-order mark) had no column 'filepath' (its header
    read '\\ufefffilepath'); a 16-bit PNG came out white, a palette's transparent pixels in their
    palette colour."""
    (tmp_path / "img").mkdir()
    images = {
        "cmyk.jpg": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),  # red
        "grey16.png": (Image.fromarray(np.full((8, 8), 32896, np.uint16)), (128, 128, 128)),  # 32896 = 128 * 257
        "grey.png": (Image.new("L", (8, 8), 100), (100, 100, 100)),
        "grey_alpha.png": (Image.new("LA", (8, 8), (100, 0)), (255, 255, 255)),  # transparent: white
        "half.png": (Image.new("RGBA", (8, 8), (0, 0, 255, 128)), (127, 127, 255)),  # half blue over white
    }
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 160, 0] + [0] * 762)
    palette.paste(0, (0, 0, 4, 8))  # the left half: index 0, transparent (red in the palette)
    palette.save(tmp_path / "img" / "palette.png", transparency=0)
    for name, (image, _) in images.items():
        image.save(tmp_path / "img" / name)
    assert Image.open(tmp_path / "img" / "grey16.png").mode == "I;16"
    assert Image.open(tmp_path / "img" / "cmyk.jpg").mode == "CMYK"
    caption = '"a red, ""round"" thing,\r\non two lines"'  # the separator, doubled quotes, a line break
    lines = ["filepath,title"] + [f"img/{n},{caption if n == 'cmyk.jpg' else n}" for n in images]
    lines.append("img/palette.png,palette")
    (tmp_path / "bom.csv").write_bytes("\r\n".join(lines).encode("utf-8-sig") + b"\r\n")
    (tmp_path / "utf16.csv").write_bytes("\r\n".join(lines).encode("utf-16"))  # its byte-order mark first
    want = {n: rgb for n, (_, rgb) in images.items()}
    for table in ("bom.csv", "utf16.csv"):
        items = list(CsvPairs(tmp_path / table, draft=4))  # the app's reduced JPEG decoding (4 px of 8)
        assert [c for _, c in items] == ['a red, "round" thing,\r\non two lines', *list(images)[1:], "palette"]
        got = {n: np.asarray(im) for n, (im, _) in zip(images, items)}
        for name, rgb in want.items():
            assert np.abs(got[name].astype(int) - rgb).max() <= 2, (table, name, got[name][0, 0])
        shown = np.asarray(items[-1][0])
        assert (shown[:, :4] == 255).all() and (shown[:, 4:] == (0, 160, 0)).all()  # transparent: white
        assert got["cmyk.jpg"].shape == (4, 4, 3) and got["grey16.png"].shape == (8, 8, 3)


def test_a_bad_row_is_warned_about_once_over_epochs(tmp_path: Path) -> None:
    # A repeating stream meets its bad rows again every epoch: one warning each, one summary, not one per epoch.
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(image_bytes(color_of(i)))
    table = write_table(tmp_path, "t.csv", ["filepath,title", "img/0.png,zero", "img/gone.png,lost", "img/1.png,one",
                                            "img/2.png,two"])
    pairs = CsvPairs(table, shuffle=True, repeat=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [c for _, c in itertools.islice(pairs, 30)]  # 10 epochs
    assert set(Counter(got).values()) == {10} and pairs.counts["missing_image"] >= 9
    assert [str(w.message) for w in caught] == [
        f"t.csv: skipping row 2 (img/gone.png): missing_image (No such file or directory: {tmp_path}/img/gone.png)",
        "t.csv: skipped 1 bad item(s) in epoch 0: {'missing_image': 1}"]

def test_tsv_columns_root_and_transform(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for i in range(3):
        (tmp_path / "data" / f"{i}.png").write_bytes(image_bytes(color_of(i)))
    tsv = write_table(tmp_path, "t.tsv", ["id\tcaption\tpath"] + [f"{i}\tcap {i}\tdata/{i}.png" for i in range(3)])
    items = list(CsvPairs(tsv, image_column="path", caption_column="caption", transform=to_tensor))
    assert [c for _, c in items] == ["cap 0", "cap 1", "cap 2"]
    assert all(isinstance(t, torch.Tensor) and t.shape == (48, 3) for t, _ in items)
    headerless = write_table(tmp_path / "data", "h.tsv", [f"{i}.png\tcap {i}" for i in range(3)])
    items = list(CsvPairs(headerless, image_column=0, caption_column=1))
    assert [pixel(im) for im, _ in items] == [color_of(i) for i in range(3)]
    elsewhere = write_table(tmp_path, "r.csv", ["filepath,title", "0.png,zero"])
    assert [c for _, c in CsvPairs(elsewhere, root=tmp_path / "data")] == ["zero"]


def test_csv_bad_arguments(tmp_path: Path) -> None:
    table = write_table(tmp_path, "p.csv", ["filepath,title", "a.png,x", "b.png,y"])
    with pytest.raises(ValueError, match="--csv-caption-key 'caption'.*'filepath', 'title'"):
        CsvPairs(table, caption_column="caption")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        CsvPairs(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="rank"):
        CsvPairs(table, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than world_size"):
        CsvPairs(table, rank=0, world_size=3)
    with pytest.raises(TypeError, match="transform"):
        CsvPairs(table, transform="resize")


def good_table(tmp: Path, n: int, bad_every: int = 0) -> Path:
    (tmp / "img").mkdir(exist_ok=True)
    lines = ["filepath,title"]
    for i in range(n):
        if bad_every and i % bad_every == 0:
            lines.append(f"img/missing{i}.png,caption {i}")
        else:
            (tmp / "img" / f"{i}.png").write_bytes(image_bytes(color_of(i)))
            lines.append(f"img/{i}.png,caption {i}")
    return write_table(tmp, "many.csv", lines)


@pytest.mark.parametrize("shuffle", [False, True])
def test_csv_split_over_ranks_and_workers(tmp_path: Path, shuffle: bool) -> None:
    table = good_table(tmp_path, 23, bad_every=5)  # rows 0, 5, 10, 15, 20 are missing
    seen: list[str] = []
    total_bad = 0
    for rank in range(2):  # (the workers' warnings go to their own stderr)
        pairs = CsvPairs(table, rank=rank, world_size=2, shuffle=shuffle, seed=3, transform=to_tensor)
        loader = DataLoader(pairs, batch_size=None, num_workers=2, multiprocessing_context="fork")
        mine = [c for _, c in loader]
        assert mine  # both ranks get rows
        seen += mine
        total_bad += pairs.counts["missing_image"]  # summed over the two worker processes
    want = [f"caption {i}" for i in range(23) if i % 5]
    assert sorted(seen) == sorted(want) and len(seen) == len(set(seen))
    assert total_bad == 5
    if shuffle:
        assert seen != want


# --- webdataset tar shards ---------------------------------------------------------------------


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> list[int]:
    """Write a tar; return the byte offset of each member's header."""
    offsets = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                offsets.append(tar.offset)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return offsets


def good_samples(prefix: str, n: int, start: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"{prefix}/{i:04d}", {"jpg": image_bytes(color_of(i), "PNG"), "txt": f"{prefix} sample {i}".encode()})
        for i in range(start, start + n)
    ]


def test_tar_yields_good_samples_and_counts_damage(tmp_path: Path) -> None:
    bad = good_samples("bad", 2) + [
        ("bad/noimg", {"txt": b"no image here"}),
        ("bad/garbage", {"png": b"\x89PNG but not really", "txt": b"corrupt"}),
        ("bad/empty", {"jpg": image_bytes((5, 5, 5)), "txt": b"  \n"}),
        ("bad/nocap", {"jpg": image_bytes((5, 5, 5))}),
        ("bad/latin1", {"jpg": image_bytes((5, 5, 5)), "txt": "caf\xe9".encode("latin-1")}),
        ("bad/upper", {"PNG": image_bytes(color_of(7)), "TXT": b"upper-case extensions"}),
    ]
    write_shard(tmp_path / "s0.tar", bad)
    cuts = {}
    for name in ("mid_data", "boundary", "mid_header"):
        offsets = write_shard(tmp_path / f"{name}.tar", good_samples(name, 5))
        data = (tmp_path / f"{name}.tar").read_bytes()
        at = {"mid_data": offsets[6] + 512 + 20, "boundary": offsets[6], "mid_header": offsets[6] + 100}[name]
        (tmp_path / f"{name}.tar").write_bytes(data[:at])  # member 6 = sample 3's image
        cuts[name] = at
    (tmp_path / "not_a_tar.tar").write_bytes(b"hello" * 300)
    urls = [str(tmp_path / n) for n in ("s0.tar", "mid_data.tar", "boundary.tar", "mid_header.tar")]
    urls += [str(tmp_path / "missing.tar"), str(tmp_path / "not_a_tar.tar")]
    shards = TarShards(urls)
    with pytest.warns(UserWarning) as caught:
        items = list(shards)
    assert sum("skipping" in str(w.message) for w in caught) == 5  # the first five, then a summary
    assert "skipped 10 bad item(s)" in str(caught[-1].message)
    captions = [c for _, c in items]
    # Whole samples before the damage survive; the sample being read when it happens is dropped
    # (at a boundary or mid-header the previous sample may be missing members, so it goes too).
    assert captions == [
        "bad sample 0",
        "bad sample 1",
        "upper-case extensions",
        "mid_data sample 0",
        "mid_data sample 1",
        "mid_data sample 2",
        "boundary sample 0",
        "boundary sample 1",
        "mid_header sample 0",
        "mid_header sample 1",
    ]
    assert pixel(items[2][0]) == color_of(7)
    assert shards.counts == counts(missing_image=1, corrupt_image=1, empty_caption=3, bad_shard=5)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_tar_split_over_ranks_and_workers_and_shuffle(tmp_path: Path) -> None:
    sizes = [3, 1, 4, 1, 5, 2, 6]
    for s, n in enumerate(sizes):
        write_shard(tmp_path / f"shard-{s:03d}.tar", good_samples(f"s{s}", n))
    pattern = str(tmp_path / "shard-{000..006}.tar")
    want = sorted(f"s{s} sample {i}" for s, n in enumerate(sizes) for i in range(n))
    for shuffle in (False, True):
        seen: list[str] = []
        for rank in range(2):
            shards = TarShards(pattern, rank=rank, world_size=2, shuffle=shuffle, transform=to_tensor)
            loader = DataLoader(shards, batch_size=None, num_workers=3, multiprocessing_context="fork")
            seen += [c for _, c in loader]
            assert shards.skipped == 0
        assert sorted(seen) == want and len(seen) == len(set(seen))
    orders = {tuple(TarShards(pattern, shuffle=True, seed=s)._mine(0)) for s in range(4)}
    assert len(orders) > 1
    with pytest.raises(ValueError, match="every rank needs a shard"):
        TarShards(str(tmp_path / "shard-{000..002}.tar"), rank=0, world_size=4)


def test_counts_shared_with_spawned_workers(tmp_path: Path) -> None:
    write_shard(tmp_path / "a.tar", good_samples("a", 2) + [("a/x", {"txt": b"no image"})])
    write_shard(tmp_path / "b.tar", good_samples("b", 1) + [("b/y", {"jpg": image_bytes((1, 1, 1))})])
    shards = TarShards(str(tmp_path / "{a,b}.tar"))
    loader = DataLoader(shards, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert sorted(c for _, c in loader) == ["a sample 0", "a sample 1", "b sample 0"]
    assert shards.counts == counts(missing_image=1, empty_caption=1)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_repeat_streams_epochs_and_never_hangs(tmp_path: Path) -> None:
    write_shard(tmp_path / "g0.tar", good_samples("g", 3))
    write_shard(tmp_path / "g1.tar", good_samples("h", 2))
    stream = TarShards(str(tmp_path / "g*.tar"), shuffle=True, repeat=True)
    got = [c for _, c in itertools.islice(stream, 50)]
    assert Counter(got) == Counter({f"{p} sample {i}": 10 for p, n in (("g", 3), ("h", 2)) for i in range(n)})
    # Three workers for two shards: the third has nothing and must end instead of spinning.
    loader = DataLoader(stream, batch_size=None, num_workers=3, multiprocessing_context="fork")
    assert len(list(itertools.islice(loader, 20))) == 20
    write_shard(tmp_path / "dud.tar", [("d/0", {"txt": b"no image"})])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable item"):
        list(itertools.islice(TarShards(str(tmp_path / "dud.tar"), repeat=True), 5))


def test_expand_urls(tmp_path: Path) -> None:
    assert expand_urls("d/{008..011}.tar") == ["d/008.tar", "d/009.tar", "d/010.tar", "d/011.tar"]
    assert expand_urls(["a/{x,y}-{0..1}.tar", "b.tar"]) == ["a/x-0.tar", "a/x-1.tar", "a/y-0.tar", "a/y-1.tar", "b.tar"]
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_urls(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    with pytest.raises(ValueError, match="no shard matches"):
        expand_urls(str(tmp_path / "*.tgz"))
    with pytest.raises(ValueError, match="empty range"):
        expand_urls("{5..3}.tar")
    with pytest.raises(ValueError, match="urls"):
        expand_urls([])


def test_csv_ids(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes(color_of(1)))
    table = write_table(tmp_path, "ids.csv", ["filepath,title,key", "a.png,one,42", "a.png,two,n01440764",
                                              "a.png,three,  ", "a.png,four,-7"])
    with pytest.warns(UserWarning, match="bad_id"):
        items = list(CsvPairs(table, id_column="key"))
    assert [(c, i) for _, c, i in items] == [("one", 42), ("two", stable_id("n01440764")), ("four", -7)]
    assert stable_id("n01440764") == stable_id("n01440764") >= 0 and parse_id(str(2**70)) == stable_id(str(2**70))
