"""``ls --json``, ``diff --json`` and ``find --json`` write their array as the entries come, one to a line,
in memory that does not grow with the listing (backup tools read these
commands' output as their interface, and a snapshot may hold ten million files)."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import chunkvault.cli as cvcli
from chunkvault import Repository

from conftest import PASSWORD
from test_damaged_storage import damage_blob

BIG = 100_000  # files in the large snapshot: a list of its JSON entries took about 90 MiB


def _dumped(items: list[Any]) -> str:
    """A list as the commands print it: one item to a line."""
    if not items:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(i, sort_keys=True, default=str) for i in items) + "\n]\n"


class _Recorder(io.TextIOBase):
    """Standard output that keeps each write, and what ``progress()`` said at the first one."""

    def __init__(self, progress: Callable[[], int] = lambda: 0):
        self.writes: list[str] = []
        self.progress = progress
        self.at_first_write: int | None = None

    def write(self, text: str) -> int:
        if self.at_first_write is None:
            self.at_first_write = self.progress()
        self.writes.append(text)
        return len(text)

    @property
    def text(self) -> str:
        return "".join(self.writes)


_texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)  # lone surrogates too
_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | _texts,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4),
                       max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(items=st.lists(_values, max_size=40), array_batch=st.integers(1, 5), write_batch=st.integers(1, 400))
def test_streamed_array_is_what_json_dumps_prints(items: list[Any], array_batch: int, write_batch: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cvcli, "_ARRAY_BATCH", array_batch)
        mp.setattr(cvcli, "_WRITE_BATCH", write_batch)
        out = _Recorder()
        mp.setattr(sys, "stdout", out)
        cvcli._emit_json_array(iter(items))
    assert out.text == _dumped(items)
    assert all(len(w) >= write_batch for w in out.writes[:-1])  # few large writes, not one per token


def _small_tree(src: Path) -> None:
    """Names that are not UTF-8, a link, nested directories, enough entries for several batches."""
    for d in range(3):
        sub = src / f"dir{d}"
        sub.mkdir(parents=True)
        for i in range(60):
            (sub / f"f{i:03d}").write_bytes(b"x" * i)
    raw = os.fsencode(src)
    for name in (b"caf\xe9", b"\xff\xfe name", "café".encode()):
        with open(os.path.join(raw, name), "wb") as f:
            f.write(name)
    os.symlink(b"caf\xe9", os.path.join(raw, b"link\x80"))


def test_small_repository_listings_match_and_are_written_while_entries_come(tmp_path, new_repo, cli, monkeypatch):
    """Each listing, run in this process with small batches, has written before it read its last entry; the
    real command prints the same bytes, those of ``json.dumps`` of the list (an empty one ``[]``)."""
    src = tmp_path / "src"
    _small_tree(src)
    repo = new_repo()
    first = repo.backup([str(src)]).snapshot
    for i in range(0, 60, 2):
        (src / "dir1" / f"f{i:03d}").write_bytes(b"changed")
    os.remove(os.fsencode(src / "dir2") + b"/f007")
    os.rename(os.fsencode(src) + b"/caf\xe9", os.fsencode(src) + b"/caf\xe9\xe9")
    second = repo.backup([str(src)]).snapshot
    url = str(repo.store.remote.display_url)
    expected_ls = _dumped([cvcli._listed_json(e, repo.owner_names(first)) for e in repo.tree(first)])
    assert any("path_b64" in e for e in json.loads(expected_ls))

    produced = [0]  # entries (or found paths) taken from the repository so far
    real_tree, real_diff, real_find = Repository.tree, Repository.diff, Repository.iter_find

    def counted(it: Any) -> Any:
        for x in it:
            produced[0] += 1
            yield x

    monkeypatch.setattr(Repository, "tree", lambda self, *a, **k: counted(real_tree(self, *a, **k)))
    monkeypatch.setattr(Repository, "diff", lambda self, *a, **k: counted(real_diff(self, *a, **k)))
    monkeypatch.setattr(Repository, "iter_find", lambda self, *a, **k: counted(real_find(self, *a, **k)))
    monkeypatch.setattr(cvcli, "_ARRAY_BATCH", 2, raising=False)
    monkeypatch.setattr(cvcli, "_WRITE_BATCH", 256, raising=False)
    monkeypatch.setenv("CHUNKVAULT_PASSWORD", PASSWORD)
    runs = {("ls", first.id): expected_ls, ("ls", second.id, "dir1"): None, ("diff", first.id, second.id): None,
            ("find", "f00*"): None, ("find", "caf*"): None}
    for argv, expected in runs.items():
        produced[0] = 0
        out = _Recorder(lambda: produced[0])
        monkeypatch.setattr(sys, "stdout", out)
        assert cvcli.main([argv[0], "-r", url, *argv[1:], "--json"]) == 0
        listed = json.loads(out.text)
        assert out.text == (expected or _dumped(listed)), argv
        assert out.at_first_write is not None and 0 < out.at_first_write < produced[0] == len(listed), argv
        assert _cli_json(cli, url, *argv) == out.text.encode("ascii"), argv

    for argv in (("diff", first.id, first.id), ("find", "nothing-matches-this")):
        assert _cli_json(cli, url, *argv) == b"[]\n"
    error = json.loads(_cli_json(cli, url, "ls", first.id, "no/such/path", check=2))["error"]
    assert error == {"type": "UsageError", "exit_code": 2, "message": f"no 'no/such/path' in snapshot {first.short_id}"}


def _cli_json(cli: Any, url: str, command: str, *args: str, check: bool | int = True) -> bytes:
    return cli(command, "-r", url, *args, "--json", check=check).stdout


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, Any]:
    """A repository with a snapshot of 10 files, one of 20, and one of ``BIG`` more (empty files in 100
    directories): the same index under every listing, so that only the listing's length differs.  The files
    are made in /dev/shm where there is one: on a disk busy with other tests' syncs, making them took 45 s."""
    base = tmp_path_factory.mktemp("big")
    shm = "/dev/shm"
    src = Path(tempfile.mkdtemp(dir=shm) if os.access(shm, os.W_OK | os.X_OK) else base / "src")
    src.mkdir(exist_ok=True)
    repo = Repository.init(str(base / "repo"), PASSWORD, kdf_seconds=0)
    try:
        for i in range(10):
            (src / f"s{i}").write_bytes(b"small")
        small = repo.backup([str(src)]).snapshot
        for i in range(10, 20):
            (src / f"s{i}").write_bytes(b"small")
        less = repo.backup([str(src)]).snapshot
        for d in range(100):
            sub = os.fsencode(src / f"d{d:03d}")
            os.mkdir(sub)
            for i in range(BIG // 100):
                os.close(os.open(sub + b"/f%05d" % i, os.O_CREAT | os.O_WRONLY, 0o644))
        large = repo.backup([str(src)]).snapshot
        manifest = [bytes.fromhex(h) for h in large.manifest]
    finally:
        repo.close()
        shutil.rmtree(src)
    return {"repo": base / "repo", "small": small.id, "less": less.id, "large": large.id, "manifest": manifest}


# The peak of a process forked from this one starts at this one's size (its copy before exec is counted):
# the command is started from a small Python of its own, which reports the peak of its child.
_PEAK_OF_CHILD = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[2:]).returncode; "
                  "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
                  "sys.exit(code)")


def _run(argv: list[str], out: Path) -> tuple[int, int, bytes]:
    """Exit code, peak RSS (KiB) and stderr of one command in a process of its own, its stdout to ``out``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    peak = out.with_suffix(".peak")
    with open(out, "wb") as f:
        proc = subprocess.run([sys.executable, "-c", _PEAK_OF_CHILD, str(peak), sys.executable, "-m", "chunkvault.cli",
                               *argv], stdout=f, stderr=subprocess.PIPE, env=env, timeout=300)
    return proc.returncode, int(peak.read_text()), proc.stderr


def test_memory_does_not_grow_with_the_listing(big, tmp_path):
    """The peak of a listing of ``BIG`` entries stays within a few MiB of a listing of ten: a list of them
    (the JSON dicts, or diff's changes) took 90 to 140 MiB more.  The remaining growth is the manifest
    blobs read ahead and the batch being written."""
    repo = str(big["repo"])
    for small, large in ((["ls", big["small"]], ["ls", big["large"]]),
                         (["diff", big["small"], big["less"]], ["diff", big["small"], big["large"]])):
        code, small_peak, _ = _run([*small, "-r", repo, "--json"], tmp_path / "small.json")
        assert code == 0 and len(json.loads((tmp_path / "small.json").read_bytes())) <= 21
        code, large_peak, _ = _run([*large, "-r", repo, "--json"], tmp_path / "large.json")
        with open(tmp_path / "large.json", "rb") as f:
            assert code == 0 and len(json.load(f)) >= BIG
        grown = (large_peak - small_peak) * 1024
        assert grown < BIG * 250, f"{large[0]}: {grown / 2**20:.1f} MiB more for {BIG} entries"


def test_damaged_blob_mid_listing_cuts_the_document_short_and_fails(big, tmp_path):
    """Damage found after the first MiB was written: the output so far is a prefix of the whole listing, then
    the usual line on stderr and exit code (no error document: it would not be JSON after the start of
    another).  Damage found before anything was written still prints the error document alone."""
    code, _, _ = _run(["ls", big["large"], "-r", str(big["repo"]), "--json"], tmp_path / "whole.json")
    whole = (tmp_path / "whole.json").read_bytes()
    assert code == 0

    late, early = tmp_path / "late", tmp_path / "early"
    for copy, blob in ((late, big["manifest"][-1]), (early, big["manifest"][0])):
        shutil.copytree(big["repo"], copy)
        with Repository.open(str(copy), PASSWORD) as repo:
            damage_blob(copy, repo, blob)

    code, _, err = _run(["ls", big["large"], "-r", str(late), "--json"], tmp_path / "late.json")
    cut = (tmp_path / "late.json").read_bytes()
    assert code == 13 and err.count(b"\n") == 1 and err.startswith(b"chunkvault: corrupt object")
    assert len(cut) >= 1 << 20 and whole.startswith(cut) and len(cut) < len(whole)

    code, _, err = _run(["ls", big["large"], "-r", str(early), "--json"], tmp_path / "early.json")
    doc = json.loads((tmp_path / "early.json").read_bytes())
    assert code == 13 and doc["error"]["exit_code"] == 13 and err.decode().strip().endswith(doc["error"]["message"])
