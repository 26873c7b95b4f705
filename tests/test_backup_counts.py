"""The backup summary's counts: every entry but a directory is a file (regular files, symbolic and hard
links, FIFOs), so new + changed + unchanged is the snapshot's files, and changed + unchanged + removed the
parent's.  Checked against a model of the tree through rounds of random changes."""
import os
import random
import shutil

import pytest

from treeutil import settle

KINDS = ("file", "symlink", "fifo", "dir")


def _make(path: str, kind: str, rnd: random.Random) -> None:
    if kind == "file":
        with open(path, "wb") as f:
            f.write(rnd.randbytes(rnd.randrange(0, 3000)))
    elif kind == "symlink":
        os.symlink(f"target-{rnd.randrange(10**6)}", path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _files(root: str) -> set[str]:
    """Every path below ``root`` that is not a directory."""
    out = set()
    for dirpath, dirs, names in os.walk(root):
        for n in names + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            out.add(os.path.relpath(os.path.join(dirpath, n), root))
    return out


def _mutate(root: str, rnd: random.Random) -> set[str]:
    """A few random changes; returns the non-directory paths written (new or changed)."""
    touched: set[str] = set()
    dirs = [root] + [os.path.join(d, n) for d, ds, _ in os.walk(root) for n in ds
                     if not os.path.islink(os.path.join(d, n))]
    for _ in range(rnd.randrange(1, 6)):
        entries = [os.path.join(d, n) for d, ds, ns in os.walk(root) for n in ds + ns]
        action = rnd.choice(("add", "add", "remove", "replace", "edit"))
        if action == "add" or not entries:
            parent = rnd.choice([d for d in dirs if os.path.isdir(d)])
            path = os.path.join(parent, f"n{rnd.randrange(10**6)}")
            kind = rnd.choice(KINDS)
            _make(path, kind, rnd)
            if kind == "dir":
                dirs.append(path)
                _make(os.path.join(path, "inner"), "file", rnd)
                touched.add(os.path.relpath(os.path.join(path, "inner"), root))
            else:
                touched.add(os.path.relpath(path, root))
            continue
        path = rnd.choice(entries)
        if not os.path.lexists(path):
            continue
        rel = os.path.relpath(path, root)
        if action == "remove":
            _remove(path)
        elif action == "replace":  # another kind (or a link retargeted) under the same name
            kind = rnd.choice(KINDS)
            _remove(path)
            _make(path, kind, rnd)
            if kind != "dir":
                touched.add(rel)
        elif os.path.isfile(path) and not os.path.islink(path):
            with open(path, "ab") as f:
                f.write(b"more")
            touched.add(rel)
    touched &= _files(root)  # written, then removed again by a later change
    return touched


@pytest.mark.parametrize("seed", range(4))
def test_the_counts_add_up_through_random_changes(tmp_path, new_repo, seed):
    rnd = random.Random(seed)
    src = str(tmp_path / "src")
    os.mkdir(src)
    for i in range(12):
        _make(os.path.join(src, f"e{i}"), KINDS[i % len(KINDS)], rnd)
    os.mkdir(os.path.join(src, "e3", "deep"))
    _make(os.path.join(src, "e3", "deep", "f"), "file", rnd)
    repo = new_repo()
    settle()
    before = _files(src)
    first = repo.backup([src]).snapshot.stats
    assert (first["new_files"], first["changed_files"], first["unchanged_files"], first["deleted"]) == (
        len(before), 0, 0, 0)
    for _ in range(6):
        touched = _mutate(src, rnd)
        settle()
        after = _files(src)
        st = repo.backup([src]).snapshot.stats
        expected_new = len(after - before)
        assert st["new_files"] == expected_new
        assert st["deleted"] == len(before - after)
        assert st["changed_files"] == len(touched & before)
        assert st["unchanged_files"] == len((after & before) - touched)
        assert st["new_files"] + st["changed_files"] + st["unchanged_files"] == st["files"] == len(after)
        before = after



def test_new_data_is_counted_as_the_files_bytes_the_manifest_apart(tmp_path, new_repo):
    """A first backup of distinct files adds their bytes exactly: the manifest's blobs are counted as
    manifest, their plaintext taken out of the total (their envelopes' size was taken out instead)."""
    import random

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(random.Random(7).randbytes(5000))
    for i in range(200):
        (src / f"small-{i}").write_text(f"{i}\n")
    stats = new_repo().backup([str(src)]).snapshot.stats
    assert stats["added_raw_bytes"] == stats["bytes"] == 5000 + sum(len(f"{i}\n") for i in range(200))
