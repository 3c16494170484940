"""Contract: every code block of README.md and docs/*.md runs, or says why not and who runs it; every
relative link resolves.

- Every fenced block is tagged `python`, `bash` or `text` (output and listings; not run).
- A `python` block runs as printed, each in a fresh namespace, all of them in ONE subprocess
  (tests/_docs_runner.py), unless its first line says otherwise:
    `# needs a GPU: REASON`       skipped with REASON when CUDA is absent (run when it is present);
    `# excerpt of PATH (run by tests/T.py ...)`
                                  its lines (blank ones and `...` aside) appear in PATH in this
                                  order, PATH exists, and T.py exists and names PATH's file (it runs
                                  it: examples/distributed_loss.py is run here, under torchrun);
    `# run by tests/T.py ...`     a block that needs what a page cannot give (torchrun, a model
                                  handed in): T.py exists and reads this page.
- A `bash` block is checked line by line (continuations joined, comments dropped), without doing
  the work: `megabatch plan` runs in full (it is arithmetic); `megabatch train` and `-m
  megabatch_train` are parsed and validated by the app's config; any other `megabatch`, `torchrun`
  (its own flags, then the script's or module's) or `python` line is stopped right after its own
  argument parser accepted the flags (exit 2 on an unknown flag or a bad value). `make T` must be a
  Makefile target, `pip install` extras must exist in pyproject.toml. Any other command fails: add
  a rule here rather than an unchecked line.
- Every relative link and image in those files points at an existing file, and a `#anchor` at a
  heading of the target page (GitHub's slugs).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGS = ("python", "bash", "text")
RUNNER_TIMEOUT_S = 300
GPU = re.compile(r"#\s*needs a GPU:\s*(.+)")
EXCERPT = re.compile(r"#\s*excerpt of (\S+)\s+\(run by (tests/\w+\.py)\b")
RUN_BY = re.compile(r"#\s*run by (tests/\w+\.py)\b")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def first(self) -> str:
        return self.code.split("\n", 1)[0].strip()


def read_blocks(page: Path) -> list[Block]:
    blocks, lines, i = [], page.read_text().split("\n"), 0
    while i < len(lines):
        opening = re.match(r"^```(\S*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{page.name}:{i + 1}: a code block that is never closed"
        blocks.append(Block(str(page.relative_to(ROOT)), i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n"))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in read_blocks(page)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]


def python_kind(block: Block) -> str:
    if GPU.match(block.first):
        return "gpu"
    if block.first.startswith("# excerpt"):
        return "excerpt"
    if RUN_BY.match(block.first):
        return "run-by"
    return "run"


# ------------------------------------------------------------------------------------------- bash

def commands(block: Block) -> list[tuple[int, list[str]]]:
    """(line number, argv) of each command of a bash block; continuations joined, comments dropped."""
    out, pending, start = [], "", 0
    for k, line in enumerate(block.code.split("\n")):
        if not pending:
            start = block.line + 1 + k
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv = shlex.split(pending + line, comments=True)
        pending = ""
        while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # VAR=value prefixes
            argv = argv[1:]
        if argv:
            out.append((start, argv))
    return out


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))


def extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[project.optional-dependencies]"):]
    section = section[: section.find("\n[", 1)]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def check_locally(argv: list[str]) -> Optional[str]:
    """Lines checked without the runner: make and pip. None when the line needs the runner."""
    if argv[0] == "make":
        missing = [t for t in argv[1:] if not t.startswith("-") and t not in makefile_targets()]
        return f"not a Makefile target: {missing}" if missing else ""
    if argv[:2] == ["pip", "install"]:
        for spec in argv[2:]:
            found = re.match(r"^(?:\.|megabatch)\[([\w,-]+)\]$", spec)
            if found:
                unknown = set(found.group(1).split(",")) - extras()
                if unknown:
                    return f"no such extra in pyproject.toml: {sorted(unknown)}"
            elif not spec.startswith("-") and spec != ".":
                return f"pip install of something other than this project: {spec!r}"
        return ""
    return None


def runner_job(job_id: str, argv: list[str]) -> Optional[dict[str, Any]]:
    """The runner's job for a command line; None when no rule covers it (its test says so)."""
    if argv[0] == "megabatch":
        return {"id": job_id, "kind": "megabatch", "argv": argv[1:]}
    if argv[0] == "torchrun":
        return {"id": job_id, "kind": "torchrun", "argv": argv[1:]}
    if argv[0] in ("python", "python3") and len(argv) > 1:
        return {"id": job_id, "kind": "script", "argv": argv[1:]}
    return None


# ---------------------------------------------------------------------------------- the one runner

def _end(proc: subprocess.Popen) -> None:
    """End a process group this module started (its own session): SIGKILL, then reap."""
    if proc.poll() is None:
        with_pgid = getattr(os, "killpg", None)
        if with_pgid is not None:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    proc.wait(timeout=30)


def run_in_subprocess(cmd: list[str], stdin: str, timeout: float) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        _end(proc)
        pytest.fail(f"{cmd[:4]} did not finish within {timeout} s")
    finally:
        _end(proc)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    """Run every python block and every command line that needs Python, in one subprocess."""
    jobs = [{"id": b.id, "kind": "python", "code": b.code} for b in PYTHON
            if python_kind(b) == "run" or (python_kind(b) == "gpu" and torch.cuda.is_available())]
    for b in BASH:
        for line, argv in commands(b):
            job = runner_job(f"{b.page}:{line}", argv) if check_locally(argv) is None else None
            if job is not None:
                jobs.append(job)
    rc, out, err = run_in_subprocess([sys.executable, str(ROOT / "tests" / "_docs_runner.py")], json.dumps(jobs),
                                     RUNNER_TIMEOUT_S)
    assert rc == 0, f"the docs runner failed (exit {rc}):\n{err[-4000:]}"
    return json.loads(out.strip().split("\n")[-1])


# ----------------------------------------------------------------------------------------- tests

def test_pages_have_blocks_and_known_languages() -> None:
    assert len(PAGES) >= 7, [p.name for p in PAGES]
    assert PYTHON and BASH
    bad = [f"{b.id} ```{b.lang}" for b in BLOCKS if b.lang not in LANGS]
    assert not bad, f"tag every block python, bash or text: {bad}"


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_block(block: Block, results: dict[str, str]) -> None:
    kind = python_kind(block)
    if kind == "gpu" and not torch.cuda.is_available():
        pytest.skip(f"{block.id}: needs a GPU: {GPU.match(block.first).group(1)}")  # type: ignore[union-attr]
    if kind == "excerpt":
        check_excerpt(block)
    elif kind == "run-by":
        test = ROOT / RUN_BY.match(block.first).group(1)  # type: ignore[union-attr]
        assert test.is_file(), f"{block.id}: {test} does not exist"
        assert block.page in test.read_text(), f"{block.id}: {test.name} does not read {block.page}"
    else:
        assert results[block.id] == "", f"{block.id} failed:\n{results[block.id]}"


def check_excerpt(block: Block) -> None:
    found = EXCERPT.match(block.first)
    assert found, f"{block.id}: write `# excerpt of PATH (run by tests/NAME.py)`, got {block.first!r}"
    path, test = ROOT / found.group(1), ROOT / found.group(2)
    assert path.is_file(), f"{block.id}: {found.group(1)} does not exist"
    assert test.is_file() and path.name in test.read_text(), f"{block.id}: {found.group(2)} does not run {path.name}"
    source = path.read_text().split("\n")
    at = 0
    for line in block.code.split("\n")[1:]:
        if not line.strip() or line.strip() == "...":
            continue
        hits = [i for i in range(at, len(source)) if source[i].strip() == line.strip()]
        assert hits, f"{block.id}: not in {found.group(1)} (after its line {at}): {line.strip()!r}"
        at = hits[0] + 1


@pytest.mark.parametrize("block", BASH, ids=lambda b: b.id)
def test_bash_block(block: Block, results: dict[str, str]) -> None:
    lines = commands(block)
    assert lines, f"{block.id}: an empty bash block"
    for line, argv in lines:
        where = f"{block.page}:{line}"
        local = check_locally(argv)
        if local is None and runner_job(where, argv) is None:
            pytest.fail(f"{where}: no rule to check `{shlex.join(argv)}` (add one to tests/test_docs.py)")
        error = local if local is not None else results[where]
        assert error == "", f"{where} `{shlex.join(argv)}`:\n{error}"


def test_distributed_example_runs_under_torchrun() -> None:
    """examples/distributed_loss.py, excerpted in docs/api.md: 2 gloo ranks, uneven batches; its
    final check compares the distributed loss with the float64 reference on the gathered batch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "distributed_loss.py"), "--loss", "siglip", "--steps", "2", "--batch", "16",
           "--uneven"]
    rc, out, err = run_in_subprocess(cmd, "", 240)
    assert rc == 0, err[-4000:]
    assert len(re.findall(r"step \d: global siglip loss", out)) == 2, out
    found = re.search(r"relative difference ([0-9.e+-]+)", out)
    assert found and float(found.group(1)) < 1e-5, out


# ----------------------------------------------------------------------------------------- links

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"^#{1,6}\s+(.*)", line)
        if heading:
            s = slug(heading.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # nor inline code
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_slug_matches_github() -> None:
    assert slug("`megabatch plan`: will it fit, and what does it send?") == \
        "megabatch-plan-will-it-fit-and-what-does-it-send"
    assert slug("The distributed convention: what each rank's loss and gradients mean") == \
        "the-distributed-convention-what-each-ranks-loss-and-gradients-mean"
    assert slug("torch.compile") == "torchcompile"


PATH_NAMED = re.compile(r"(?<![\w/.-])((?:src|tests|benchmarks)/[A-Za-z0-9_./{}*-]+)")


def named_paths(page: Path) -> list[str]:
    """The repository paths (src/..., tests/..., benchmarks/...) a page names; a pattern is cut at its
    first `{` or `*`, and `NAME` stands for any name (a placeholder, not a path)."""
    out = []
    for found in PATH_NAMED.findall(page.read_text()):
        path = re.split(r"[{*]", found.rstrip(".,:;)"))[0]
        if "NAME" not in path:
            out.append(path + ("*" if path != found.rstrip(".,:;)") else ""))
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_paths_a_page_names_exist(page: Path) -> None:
    missing = [p for p in named_paths(page)
               if not (any((ROOT / p).parent.glob((ROOT / p).name)) if p.endswith("*") else (ROOT / p).exists())]
    assert not missing, f"{page.name} names paths that are not in the tree: {missing}"
