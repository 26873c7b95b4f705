"""The PostgreSQL WAL archive: names, the sealed object, archive-push / archive-get / archive-list /
archive-expire, and what prune, check and the HTTP service do with ``wal/`` objects."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import threading
import time
from datetime import timezone

import pytest
from hypothesis import given, strategies as st

from chunkvault import Repository
from chunkvault.errors import (ArchiveConflict, CorruptObject, Locked, NewerObject, RepositoryStateWarning, UsageError,
                               WalHeaderMismatch, WalNotArchived)
from chunkvault.store.crypto import Sealer
from chunkvault.store.repository import pack_key
from chunkvault.store.walarchive import WalFile
from chunkvault.store.walnames import check_wal_name, expired, fetch_ahead, ready_ahead
from conftest import PASSWORD
from servers_http import APPEND_TOKEN, FULL_TOKEN, http_server, serve_factory  # noqa: F401
from walsegments import segment_bytes, write_segment

SEG = "000000010000000000000001"
HEX = "0123456789ABCDEF"

segments = st.text(HEX, min_size=24, max_size=24)
wal_names = st.one_of(
    segments,
    segments.map(lambda s: s + ".partial"),
    st.tuples(segments, st.text(HEX, min_size=8, max_size=8)).map(lambda t: f"{t[0]}.{t[1]}.backup"),
    st.text(HEX, min_size=8, max_size=8).map(lambda t: t + ".history"),
)


def segment_file(directory, name: str = SEG, seed: int = 1, size: int = 16 << 20):
    """A WAL segment: its header, some random pages, the rest zero (as a segment switched early is)."""
    return write_segment(directory, name, seed, size)


# --- names and the object ----------------------------------------------------------------------------------


@given(wal_names)
def test_every_name_postgresql_archives_is_taken(name):
    assert check_wal_name(name) == name


@pytest.mark.parametrize("name", ["", "out", "00000001000000000000000", "0000000100000000000000001",
                                  "00000001000000000000000a", "000000010000000000000001.PARTIAL",
                                  "000000010000000000000001.history", "00000002.backup", "../00000002.history",
                                  "000000010000000000000001/", "000000010000000000000001.0000002.backup",
                                  "000000010000000000000001\n", "RECOVERYHISTORY", "RECOVERYXLOG", 5, None])
def test_other_names_are_usage_errors(name):
    with pytest.raises(UsageError, match="not the name of a file PostgreSQL archives"):
        check_wal_name(name)


@given(st.text(min_size=1, max_size=40).filter(lambda t: not all(c in HEX + ".partilbckuhsoy" for c in t)))
def test_names_with_other_characters_are_refused(name):
    with pytest.raises(UsageError):
        check_wal_name(name)


wal_files = st.builds(
    WalFile, name=wal_names, size=st.integers(0, 1 << 40),
    blobs=st.lists(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=80),
    time=st.datetimes(timezones=st.just(timezone.utc)).map(
        lambda t: t.isoformat(timespec="microseconds")),
    host=st.text(max_size=30))


@given(wal_files, st.binary(min_size=32, max_size=32))
def test_objects_round_trip_and_open_under_their_own_name_only(w, key):
    s = Sealer(key)
    data = w.encode(s)
    assert WalFile.decode(s, w.name, data) == w
    other = "00000009.history" if w.name != "00000009.history" else SEG
    with pytest.raises(CorruptObject, match="authentication failed"):
        WalFile.decode(s, other, data)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    with pytest.raises(CorruptObject):
        WalFile.decode(s, w.name, bytes(flipped))


def test_objects_of_a_newer_version_or_malformed_are_refused():
    import zstandard

    from chunkvault.store.walarchive import WAL_AD

    s = Sealer(bytes(32))

    def sealed(body, name=SEG):
        return s.seal(zstandard.ZstdCompressor().compress(json.dumps(body).encode()), WAL_AD + name.encode())

    good = {"version": 1, "name": SEG, "size": 4, "blobs": ["ab" * 32], "time": "2026-01-01T00:00:00+00:00",
            "host": "h"}
    assert WalFile.decode(s, SEG, sealed({**good, "version": True})).size == 4
    with pytest.raises(NewerObject, match="newer chunkvault"):
        WalFile.decode(s, SEG, sealed({**good, "version": 2}))
    for bad in ({"name": "000000010000000000000002"}, {"size": -1}, {"size": "4"}, {"blobs": ["AB" * 32]},
                {"blobs": "ab"}, {"time": "2026-01-01T00:00:00"}, {"host": None}, {"extra": 1}, {"version": 0}):
        with pytest.raises(CorruptObject):
            WalFile.decode(s, SEG, sealed({**good, **bad}))


@given(st.lists(wal_names, max_size=30, unique=True), segments)
def test_expire_takes_the_earlier_segments_of_the_timeline_and_never_a_history_file(names, before):
    gone = expired(names, before)
    for n in names:
        earlier = not n.endswith(".history") and n[:8] == before[:8] and n[:24] < before
        assert (n in gone) == earlier


def test_expire_examples():
    names = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000002.00000028.backup",
             "000000010000000000000003", "000000010000000000000003.partial", "00000002.history",
             "000000020000000000000001", "000000020000000000000003"]
    assert expired(names, "000000010000000000000003") == [
        "000000010000000000000001", "000000010000000000000002", "000000010000000000000002.00000028.backup"]
    assert expired(names, "000000020000000000000003.00000060.backup") == ["000000020000000000000001"]
    assert expired(names, "000000020000000000000003", earlier_timelines=True) == [
        "000000010000000000000001", "000000010000000000000002", "000000010000000000000002.00000028.backup",
        "000000020000000000000001"]
    with pytest.raises(UsageError, match="timeline history"):
        expired(names, "00000002.history")
    with pytest.raises(UsageError):
        expired(names, "latest")


# --- the commands ----------------------------------------------------------------------------------------


@pytest.fixture
def repo_url(tmp_path, cli):
    url = str(tmp_path / "repo")
    cli("init", "-r", url, "--kdf-time", "0")
    return url


def test_push_and_get_a_16_mib_segment(tmp_path, cli, repo_url):
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    seg = segment_file(wal)
    out = json.loads(cli("archive-push", "-r", repo_url, str(seg), "--json").stdout)
    assert out["name"] == SEG and out["size"] == 16 << 20 and out["already_archived"] is False
    assert out["new_blobs"] > 0 and out["stored_bytes"] < 6 << 20  # the zero pages compress
    assert (tmp_path / "repo" / "wal" / SEG).is_file()
    assert not list((tmp_path / "repo" / "locks").glob("*"))
    restore = tmp_path / "restore"
    restore.mkdir()
    cli("archive-get", "-r", repo_url, SEG, str(restore / "RECOVERYXLOG"))
    assert (restore / "RECOVERYXLOG").read_bytes() == seg.read_bytes()
    assert os.listdir(restore) == ["RECOVERYXLOG"]  # no temporary file left beside it
    listing = json.loads(cli("archive-list", "-r", repo_url, "--json").stdout)["files"]
    assert [(w["name"], w["size"]) for w in listing] == [(SEG, 16 << 20)]
    assert SEG in cli("archive-list", "-r", repo_url).stdout.decode()


def test_a_push_again_with_the_same_content_succeeds_and_other_content_is_refused(tmp_path, cli, repo_url):
    seg = segment_file(tmp_path)
    cli("archive-push", "-r", repo_url, str(seg))
    stored = tmp_path / "repo"

    def objects():
        return {str(p.relative_to(stored)): p.read_bytes() for p in stored.rglob("*")
                if p.is_file() and p.parts[-2] != "locks" and not p.name.startswith(".")}

    before = objects()
    again = cli("archive-push", "-r", repo_url, str(seg))
    assert "already archived" in again.stdout.decode()
    assert objects() == before
    data = bytearray(seg.read_bytes())
    data[5000] ^= 0xFF
    seg.write_bytes(bytes(data))
    refused = cli("archive-push", "-r", repo_url, str(seg), check=22)
    lines = refused.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "archived already" in lines[0] and "nothing was stored" in lines[0]
    assert objects() == before  # not a pack, not an index object more
    got = tmp_path / "got"
    cli("archive-get", "-r", repo_url, SEG, str(got))
    assert got.read_bytes() != seg.read_bytes() and len(got.read_bytes()) == 16 << 20


def test_missing_names_exit_1_and_bad_ones_2(tmp_path, cli, repo_url):
    for name in ("00000002.history", SEG):
        result = cli("archive-get", "-r", repo_url, name, str(tmp_path / "x"), check=1)
        assert result.stderr.decode().strip() == f"chunkvault: {name} is not in the WAL archive"
    assert not (tmp_path / "x").exists()
    bad = tmp_path / "postmaster.pid"
    bad.write_bytes(b"1")
    for args in (("archive-get", "-r", repo_url, "x/../etc", str(tmp_path / "x")),
                 ("archive-push", "-r", repo_url, str(bad)),
                 ("archive-push", "-r", repo_url, str(tmp_path / SEG)),  # no such file
                 ("archive-expire", "-r", repo_url, "--before", "00000001.history")):
        result = cli(*args, check=2)
        assert len(result.stderr.decode().strip().splitlines()) == 1


def test_a_damaged_blob_is_an_error_naming_it_never_wrong_bytes(tmp_path, cli, repo_url, password):
    seg = segment_file(tmp_path)
    cli("archive-push", "-r", repo_url, str(seg))
    with Repository.open(repo_url, password) as repo:
        blob = repo.archive_list()[0].blob_ids()[0]
        loc = repo.store.locate(blob)
        pack = tmp_path / "repo" / pack_key(repo.store.pack_ids[loc.pack_no])
    data = bytearray(pack.read_bytes())
    data[loc.offset + loc.length // 2] ^= 1
    os.chmod(pack, 0o600)
    pack.write_bytes(bytes(data))
    dest = tmp_path / "restore" / "RECOVERYXLOG"
    dest.parent.mkdir()
    result = cli("archive-get", "-r", repo_url, SEG, str(dest), check=13)
    line = result.stderr.decode().strip()
    assert blob.hex() in line and f"wal/{SEG}" in line, line
    assert os.listdir(dest.parent) == []
    report = json.loads(cli("check", "-r", repo_url, "--read-data", "--json", check=18).stdout)
    assert any(p["object"] == f"wal/{SEG}" for p in report["problems"]), report


def test_a_segment_whose_pack_is_lost_names_archive_push_which_heals_it(tmp_path, cli, repo_url, password):
    """`repair snapshots` does nothing for an archived file: once `repair index` dropped the lost pack,
    archive-get named it all the same.  It names pushing the file again, which stores its data again."""
    seg = segment_file(tmp_path, size=1 << 20)
    cli("archive-push", "-r", repo_url, str(seg))
    with Repository.open(repo_url, password) as repo:
        loc = repo.store.locate(repo.archive_list()[0].blob_ids()[0])
        os.remove(tmp_path / "repo" / pack_key(repo.store.pack_ids[loc.pack_no]))
    cli("repair", "-r", repo_url, "index")
    dest = tmp_path / "restore" / "RECOVERYXLOG"
    dest.parent.mkdir()
    line = cli("archive-get", "-r", repo_url, SEG, str(dest), check=13).stderr.decode().strip()
    assert f"wal/{SEG}" in line and "`archive-push` the file again" in line and "repair snapshots" not in line, line
    cli("archive-push", "-r", repo_url, str(seg))
    cli("archive-get", "-r", repo_url, SEG, str(dest))
    assert dest.read_bytes() == seg.read_bytes()


def test_fatal_errors_exit_150_for_all_but_a_name_not_archived(tmp_path, cli, repo_url):
    """PostgreSQL takes a restore_command's exit above 125 as fatal, any other as the end of the archive: with
    --fatal-errors a repository missing, a wrong password or a damaged object (as any error but a name not
    archived) stops the recovery (150), where a recovery to the end of the archive was promoted short of it;
    a name not archived stays 1."""
    seg = segment_file(tmp_path, size=1 << 20)
    cli("archive-push", "-r", repo_url, str(seg))
    dest = tmp_path / "restore" / "RECOVERYXLOG"
    dest.parent.mkdir()
    cli("archive-get", "-r", repo_url, "--fatal-errors", SEG, str(dest))
    assert dest.read_bytes() == seg.read_bytes()
    cli("archive-get", "-r", repo_url, "--fatal-errors", "00000002.history", str(tmp_path / "x"), check=1)
    for url, password, plain in ((str(tmp_path / "gone"), PASSWORD, 10), (repo_url, "not the password", 11)):
        argv = ["archive-get", "-r", url, SEG, str(tmp_path / "x")]
        cli(*argv, password=password, check=plain)
        said = cli(*argv, "--fatal-errors", password=password, check=150).stderr.decode().strip()
        assert len(said.splitlines()) == 1 and said.startswith("chunkvault: "), said
    for pack in (p for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()):
        os.chmod(pack, 0o600)
        pack.write_bytes(b"\0" * pack.stat().st_size)
    cli("archive-get", "-r", repo_url, "--fatal-errors", "--no-cache", SEG, str(tmp_path / "x"), check=150)
    assert not (tmp_path / "x").exists()


def test_check_names_a_damaged_wal_object_and_an_unindexed_blob(tmp_path, cli, repo_url, password):
    cli("archive-push", "-r", repo_url, str(segment_file(tmp_path, size=1 << 20)))
    cli("archive-push", "-r", repo_url, str(segment_file(tmp_path, "000000010000000000000002", seed=2,
                                                          size=1 << 20)))
    report = json.loads(cli("check", "-r", repo_url, "--json").stdout)
    assert report["ok"] and report["wal_files"] == 2
    obj = tmp_path / "repo" / "wal" / SEG
    (tmp_path / "repo" / "wal" / "000000010000000000000002").write_bytes(obj.read_bytes())  # moved
    for index in (tmp_path / "repo" / "index").iterdir():
        index.unlink()
    report = json.loads(cli("check", "-r", repo_url, "--json", "--no-cache", check=18).stdout)
    objects = [p["object"] for p in report["problems"]]
    assert "wal/000000010000000000000002" in objects
    assert f"wal/{SEG}" in objects and any(o.startswith("blob ") for o in objects), objects


def test_prune_keeps_what_archived_wal_needs_and_frees_it_once_expired(tmp_path, password):
    repo = Repository.init(str(tmp_path / "repo"), password, kdf_seconds=0, pack_size="1M")
    src = tmp_path / "src"
    src.mkdir()
    segs = [segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=4 << 20) for i in (1, 2, 3)]
    (src / "copy").write_bytes(segs[0].read_bytes())  # a backup holding the same chunks: deduplicated
    snap = repo.backup([str(src)]).snapshot
    for seg in segs:
        repo.archive_push(seg)
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    repo.archive_push(history)
    label = tmp_path / "000000010000000000000002.00000028.backup"
    label.write_text("START WAL LOCATION: 0/2000028\n")
    repo.archive_push(label)
    repo.forget([snap.id])
    repo.prune(max_unused=0)
    for seg in segs:
        repo.archive_get(seg.name, tmp_path / "got")
        assert (tmp_path / "got").read_bytes() == seg.read_bytes()
    assert repo.check(read_data=True).ok
    packed = repo.stats().pack_bytes
    gone = repo.archive_expire("000000010000000000000003", dry_run=True)
    assert gone == ["000000010000000000000001", "000000010000000000000002",
                    "000000010000000000000002.00000028.backup"]
    assert len(repo.archive_list()) == 5
    assert repo.archive_expire("000000010000000000000003") == gone
    assert [w.name for w in repo.archive_list()] == ["000000010000000000000003", "00000002.history"]
    repo.prune(max_unused=0)
    assert repo.stats().pack_bytes < packed * 0.6
    with pytest.raises(WalNotArchived):
        repo.archive_get("000000010000000000000001", tmp_path / "got")
    repo.archive_get("00000002.history", tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == history.read_bytes()
    assert repo.check(read_data=True).ok
    repo.close()


def test_a_damaged_wal_object_stops_prune(tmp_path, password):
    repo = Repository.init(str(tmp_path / "repo"), password, kdf_seconds=0)
    repo.archive_push(segment_file(tmp_path, size=1 << 20))
    obj = tmp_path / "repo" / "wal" / SEG
    data = bytearray(obj.read_bytes())
    data[-1] ^= 1
    os.chmod(obj, 0o600)
    obj.write_bytes(bytes(data))
    with pytest.raises(CorruptObject, match=f"wal/{SEG}.*prune needs every wal object"):
        repo.prune(max_unused=0)
    repo.close()


def test_repair_wal_removes_the_objects_that_do_not_load_so_prune_goes_on(tmp_path, cli):
    """A wal object that does not load stops prune, which needs every one: damaged, or planted by a client
    that may only add (any bytes under a name sorting after the archive's end). Its data is lost either way,
    and nothing could remove it over `serve`: the remedy prune named, archive-expire before a later segment,
    removed the real archive with it. An object a newer chunkvault wrote is no damage, and stays."""
    import zstandard

    from chunkvault.store.walarchive import WAL_AD

    url = str(tmp_path / "repo")
    cli("init", "-r", url, "--kdf-time", "0")
    wal, names, dest = archived_segments(tmp_path, cli, url, 2)
    planted, newer = "000000010000000000000009.partial", "00000001000000000000000A"
    (tmp_path / "repo" / "wal" / planted).write_bytes(os.urandom(300))
    with Repository.open(url, PASSWORD) as repo:
        body = {"version": 2, "name": newer, "size": 4, "blobs": [], "time": "2026-01-01T00:00:00+00:00",
                "host": "h"}
        sealed = repo._repo.sealer.seal(zstandard.ZstdCompressor().compress(json.dumps(body).encode()),
                                        WAL_AD + newer.encode())
    (tmp_path / "repo" / "wal" / newer).write_bytes(sealed)
    said = cli("prune", "-r", url, check=13).stderr.decode()
    assert f"wal/{planted}" in said and "`repair wal --confirm REPAIR` removes those that do not load" in said
    out = cli("repair", "wal", "-r", url).stdout.decode().splitlines()
    assert out[0].startswith(f"would remove wal/{planted}: ") and out[1:] == [
        "nothing changed: add --confirm REPAIR to remove these objects"]
    assert (tmp_path / "repo" / "wal" / planted).exists()
    report = json.loads(cli("repair", "wal", "-r", url, "--confirm", "REPAIR", "--json").stdout)
    assert [w["name"] for w in report["damaged_wal"]] == [planted] and not report["dry_run"]
    assert sorted(os.listdir(tmp_path / "repo" / "wal")) == sorted(names + [newer])
    (tmp_path / "repo" / "wal" / newer).unlink()  # what an upgraded chunkvault would read
    cli("prune", "-r", url)
    for name in names:
        cli("archive-get", "-r", url, name, str(dest))
        assert dest.read_bytes() == (wal / name).read_bytes()
    assert cli("repair", "wal", "-r", url).stdout == b"no archived WAL object is damaged\n"


def test_a_push_holds_off_prune_until_its_object_is_written(tmp_path, password, monkeypatch):
    """Its blobs are in no wal object until the end: the shared lock is what keeps a prune from them."""
    from chunkvault.store.backup import Backup

    url = str(tmp_path / "repo")
    Repository.init(url, password, kdf_seconds=0).close()
    seg = segment_file(tmp_path, size=1 << 20)
    reading, resume = threading.Event(), threading.Event()
    store = Backup.store_stream

    def paused(self, stream, rel, lock):
        result = store(self, stream, rel, lock)
        reading.set()
        resume.wait(30)
        return result

    monkeypatch.setattr(Backup, "store_stream", paused)
    pusher = Repository.open(url, password)
    errors = []

    def push():
        try:
            pusher.archive_push(seg)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=push)
    thread.start()
    try:
        assert reading.wait(30)
        with Repository.open(url, password) as other:
            with pytest.raises(Locked):
                other.prune(max_unused=0, wait=0)
            with pytest.raises(Locked):
                other.archive_expire(SEG, wait=0)
    finally:
        resume.set()
        thread.join(30)
    assert not errors
    with Repository.open(url, password) as other:
        other.prune(max_unused=0)
        other.archive_get(SEG, tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == seg.read_bytes()
    pusher.close()


def test_api_argument_errors(tmp_path, new_repo):
    repo = new_repo()
    with pytest.raises(UsageError):
        repo.archive_push(None)
    with pytest.raises(UsageError):
        repo.archive_get("not-wal", tmp_path / "x")
    with pytest.raises(UsageError):
        repo.archive_get(SEG, "")
    with pytest.raises(UsageError):
        repo.archive_push(segment_file(tmp_path, size=1 << 20), host="")
    seg = segment_file(tmp_path, size=1 << 20)
    repo.archive_push(seg)  # the first push is taken: only the second, of other bytes, conflicts
    segment_file(tmp_path, seed=2, size=1 << 20)
    with pytest.raises(ArchiveConflict):
        repo.archive_push(seg)


def test_append_only_service_takes_pushes_and_refuses_expire(tmp_path, http_server, cli):
    url = http_server.url

    def env(token):
        return {"CHUNKVAULT_HTTP_TOKEN": token, "CHUNKVAULT_CACHE_DIR": str(tmp_path / f"cache-{token[:6]}")}

    cli("init", "-r", url, "--kdf-time", "0", env=env(FULL_TOKEN))
    seg = segment_file(tmp_path, size=2 << 20)
    first = cli("archive-push", "-r", url, str(seg), env=env(APPEND_TOKEN))
    assert first.stderr == b""  # PostgreSQL's log gets no line per segment for the format it cannot raise
    stored_format = json.loads((http_server.path / "config").read_bytes())["format"]
    assert stored_format == 1  # the config is not the token's to rewrite: the next full token's prune raises it
    cli("archive-push", "-r", url, str(seg), env=env(APPEND_TOKEN))  # again: same content
    assert (http_server.path / "wal" / SEG).is_file()
    cli("archive-get", "-r", url, SEG, str(tmp_path / "got"), env=env(APPEND_TOKEN))
    assert (tmp_path / "got").read_bytes() == seg.read_bytes()
    result = cli("archive-expire", "-r", url, "--before", "000000010000000000000002", env=env(APPEND_TOKEN),
                 check=14)
    assert "append-only" in result.stderr.decode()
    assert (http_server.path / "wal" / SEG).is_file()
    cli("prune", "-r", url, env=env(FULL_TOKEN))
    assert json.loads((http_server.path / "config").read_bytes())["format"] == 2
    out = json.loads(cli("archive-expire", "-r", url, "--before", "000000010000000000000002", "--json",
                         env=env(FULL_TOKEN)).stdout)
    assert out == {"dry_run": False, "removed": [SEG]}
    assert not (http_server.path / "wal" / SEG).exists()


def test_a_push_whose_lock_was_lost_takes_its_object_back(tmp_path, new_repo, monkeypatch):
    """Judged stale while it wrote (paused, cut off), its lock may have let a prune delete its blobs: the object
    naming them is removed again, and the push fails (PostgreSQL pushes the file again)."""
    from chunkvault.errors import LockLost
    from chunkvault.store.locks import RepoLock

    repo = new_repo()
    seg = segment_file(tmp_path, size=1 << 20)
    confirm = RepoLock.confirm
    calls = []

    def lost_after_the_write(self):
        calls.append(self.purpose)
        if len(calls) == 2:
            raise LockLost("this archive-push's repository lock was removed by another command")
        return confirm(self)

    monkeypatch.setattr(RepoLock, "confirm", lost_after_the_write)
    with pytest.raises(LockLost):
        repo.archive_push(seg)
    assert calls == ["archive-push", "archive-push"]
    assert repo.archive_list() == []
    monkeypatch.setattr(RepoLock, "confirm", confirm)
    assert not repo.archive_push(seg).already
    repo.archive_get(SEG, tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == seg.read_bytes()



def test_a_push_again_of_a_file_whose_data_was_lost_stores_it_again(tmp_path, new_repo):
    """A pack lost and the index repaired: ``check`` says pushing the file again heals it, and it does (the
    object names the same blobs); a push of other content is refused still."""
    repo = new_repo(str(tmp_path / "repo"))
    seg = segment_file(tmp_path, size=1 << 20)
    repo.archive_push(seg)
    for pack in (tmp_path / "repo" / "data").rglob("*"):
        if pack.is_file():
            pack.unlink()
    repo.repair_index()
    problems = [p for p in repo.check().problems if p.object == f"wal/{SEG}"]
    assert problems and "archive-push` the file again" in problems[0].problem, problems
    healed = repo.archive_push(seg)
    assert not healed.already and healed.new_blobs > 0
    repo.archive_get(SEG, tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == seg.read_bytes()
    assert repo.check(read_data=True).ok
    assert repo.archive_push(seg).already
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ArchiveConflict, match="nothing was stored"):
        repo.archive_push(segment_file(other, seed=5, size=1 << 20))


def test_the_loser_of_a_same_name_race_says_its_data_is_left_for_prune(tmp_path, new_repo, monkeypatch):
    """Its blobs were written before the other object was: not "nothing was stored"."""
    from chunkvault.store import walarchive

    repo = new_repo()
    repo.archive_push(segment_file(tmp_path, size=1 << 20))
    other = tmp_path / "other"
    other.mkdir()
    load = walarchive.load
    calls = []

    def not_yet_there(r, name, **kwargs):  # the first look at it, before the other push's object was written
        calls.append(name)
        return None if calls.count(SEG) == 1 and name == SEG else load(r, name, **kwargs)

    monkeypatch.setattr(walarchive, "load", not_yet_there)
    with pytest.raises(ArchiveConflict, match="its data is left for prune to free") as raised:
        repo.archive_push(segment_file(other, seed=5, size=1 << 20))
    assert "nothing was stored" not in str(raised.value)
    monkeypatch.undo()
    assert repo.prune().freed_bytes > 0

@given(st.integers(1, 0xFFFFFFFF), st.sampled_from([1 << 20, 16 << 20, 64 << 20, 1 << 30]),
       st.sets(st.integers(0, 2000), min_size=1, max_size=60), st.data())
def test_timelines_name_every_missing_segment_across_the_log_boundary(tli, seg_size, segnos, data):
    from chunkvault.store.walnames import timelines

    per_log = (1 << 32) // seg_size
    base = (data.draw(st.integers(0, 3)) + 1) * per_log - min(per_log, 1000)  # spans cross into the next log
    names = {n: f"{tli:08X}{(base + n) // per_log:08X}{(base + n) % per_log:08X}" for n in range(2001)}
    assert all(len(name) == 24 and check_wal_name(name) for name in names.values())
    files = [(names[n], seg_size) for n in segnos]
    last = max(segnos)
    if data.draw(st.booleans()):  # a promotion's partial segment counts for its segment; labels for none
        files[-1] = (files[-1][0] + ".partial", seg_size)
    files += [(names[min(segnos)] + ".00000028.backup", 300), ("00000002.history", 40)]
    [span] = timelines(files)
    assert (span.timeline, span.first, span.last, span.segments) == (tli, names[min(segnos)], names[last],
                                                                     len(segnos))
    assert span.missing == [names[n] for n in range(min(segnos), last + 1) if n not in segnos]


@given(st.sets(st.integers(1, 60), min_size=1, max_size=40), st.lists(st.integers(0, 70), max_size=3))
def test_recovery_gaps_are_the_missing_segments_from_the_earliest_start_on(segnos, starts):
    from chunkvault.store.walnames import recovery_gaps, timelines

    files = [(f"000000010000000000000{n:03X}", 16 << 20) for n in segnos]
    named = [f"000000010000000000000{n:03X}" for n in starts]
    gaps = recovery_gaps(files, named)
    expect = [n for n in range(min(segnos), max(segnos) + 1) if n not in segnos and n >= min(starts, default=0)]
    assert [m for span in gaps for m in span.missing] == [f"000000010000000000000{n:03X}" for n in expect]
    assert all(span.missing for span in gaps) and len(gaps) <= len(timelines(files))
    end = max(segnos) // 2  # a later timeline branched off in that segment: none after it is read
    assert [m for span in recovery_gaps(files, named, {1: end * (16 << 20) + 40}) for m in span.missing] == [
        f"000000010000000000000{n:03X}" for n in expect if n <= end]


def test_recovery_gaps_reach_to_where_an_earlier_timeline_ended():
    """A timeline a later one branched off is read up to the segment the later one starts in: its segments
    missing after its last archived one (a failover: the old primary's last ones never archived) stop every
    recovery from an earlier copy, though none is missing between archived ones."""
    from chunkvault.store.walnames import recovery_gaps

    size = 16 << 20

    def missing(tl1, ends, starts=()):
        files = [(f"00000001000000000000000{n}", size) for n in tl1] + [
            ("000000020000000000000005", size), ("000000020000000000000006", size), ("00000002.history", 40)]
        return [m for span in recovery_gaps(files, list(starts), ends) for m in span.missing]

    mid = 5 * size + 0x4A0  # timeline 2 starts in segment 5, with a copy of timeline 1 up to there
    assert missing([1, 2], {1: mid}) == ["000000010000000000000003", "000000010000000000000004"]
    assert missing([1, 2, 4], {1: mid}) == ["000000010000000000000003"]
    assert missing([1, 2, 3, 4], {1: mid}) == []  # segment 5 of timeline 1 is read from timeline 2's
    assert missing([1, 2, 3, 4], {1: 5 * size}) == []  # a switch at a segment's start: 5 is timeline 2's own
    assert missing([1, 2, 3], {1: 5 * size}) == ["000000010000000000000004"]
    assert missing([1, 2], {1: mid}, ["000000020000000000000005"]) == []  # no copy here starts before it
    assert missing([1, 2], {}) == []  # no history: where timeline 1 ended is not known


def test_check_warns_of_the_segments_a_timeline_lacks_before_the_next_one_branched_off(tmp_path, new_repo):
    repo = new_repo()
    for i in (1, 2):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/400000\tno recovery target specified\n")
    repo.archive_push(history)
    repo.archive_push(segment_file(tmp_path, "000000020000000000000004", seed=4, size=1 << 20))
    assert repo.check().warnings == [
        "archived WAL of timeline 1 lacks 1 segment(s) from 000000010000000000000001 up to where it ended, at "
        "0/400000 (000000010000000000000003): a recovery through them stops at the first"]
    repo.archive_push(segment_file(tmp_path, "000000010000000000000003", seed=3, size=1 << 20))
    assert repo.check().warnings == []


def test_check_warns_of_a_gap_a_recovery_would_stop_at(tmp_path, new_repo):
    """A segment missing between archived ones (archive_mode off for a while, an object deleted by hand) is
    no damage, but a recovery through it stops there: check says so, from the oldest base backup's start on
    (recorded, or in its backup_label), and not past where a timeline the newest one left ended."""
    import dataclasses

    repo = new_repo()
    for i in (1, 2, 4, 5, 8):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))
    report = repo.check()
    assert report.ok and report.warnings == [
        "archived WAL of timeline 1 lacks 3 segment(s) between 000000010000000000000001 and "
        "000000010000000000000008 (000000010000000000000003, 000000010000000000000006, 000000010000000000000007): "
        "a recovery through them stops at the first"]
    data = tmp_path / "data"
    data.mkdir()
    snap = repo.backup([str(data)]).snapshot
    repo.store.save_snapshot(dataclasses.replace(snap, stats={**snap.stats, "postgres": {
        "start_wal": "000000010000000000000004"}}), replace=True)
    assert [w for w in repo.check().warnings if "lacks" in w] == [
        "archived WAL of timeline 1 lacks 2 segment(s) between 000000010000000000000001 and "
        "000000010000000000000008 (000000010000000000000006, 000000010000000000000007): "
        "a recovery through them stops at the first"]
    # An older copy taken by a hook records no start: its backup_label's counts (segment 2 on).
    (data / "backup_label").write_text("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n")
    copy = repo.backup([str(data)], kind="full").snapshot
    repo.store.save_snapshot(dataclasses.replace(copy, time="2020-01-01T00:00:00+00:00"), replace=True)
    assert [w for w in repo.check().warnings if "lacks" in w][0].startswith(
        "archived WAL of timeline 1 lacks 3 segment(s)")
    for i in (3, 6, 7):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))
    # Timeline 2 branched off in segment 7 (of 1 MiB): the gap after it on timeline 1 is read by no recovery.
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/700100\tbefore 2026-12-05 10:00:00+00\n")
    repo.archive_push(history)
    repo.archive_push(segment_file(tmp_path, "00000001000000000000000A", seed=10, size=1 << 20))
    repo.archive_push(segment_file(tmp_path, "000000020000000000000007", seed=11, size=1 << 20))
    assert not [w for w in repo.check().warnings if "lacks" in w]
    assert repo.wal_history() == (2, {1: 0x700100})


def test_archive_list_says_what_is_missing(tmp_path, cli, repo_url):
    for name in ("000000010000000000000001", "000000010000000000000002", "000000010000000000000004",
                 "000000020000000000000004"):
        cli("archive-push", "-r", repo_url, str(segment_file(tmp_path, name, size=1 << 20)))
    out = json.loads(cli("archive-list", "-r", repo_url, "--json").stdout)
    assert [f["name"] for f in out["files"]][-1] == "000000020000000000000004"
    assert out["timelines"] == [
        {"timeline": 1, "first": "000000010000000000000001", "last": "000000010000000000000004", "segments": 3,
         "missing": ["000000010000000000000003"]},
        {"timeline": 2, "first": "000000020000000000000004", "last": "000000020000000000000004", "segments": 1,
         "missing": []}]
    text = cli("archive-list", "-r", repo_url).stdout.decode()
    assert "timeline 1: 3 segments from 000000010000000000000001 to 000000010000000000000004; 1 missing: " \
           "000000010000000000000003" in text


def test_a_stopped_push_leaves_no_object_and_no_lock(tmp_path, new_repo, monkeypatch):
    import io

    from chunkvault.errors import Stopped
    from chunkvault.store import walarchive

    repo = new_repo()

    class StopMidway(io.BufferedReader):
        """The segment's reader, which stops the push (as Ctrl-C does) once part of it is read."""

        reads = 0

        def _count(self):
            StopMidway.reads += 1
            if StopMidway.reads == 3:  # after the header and the first block
                repo.stop()
                time.sleep(0.6)  # past the next progress point

        def read(self, size=-1):
            self._count()
            return super().read(size)

        def readinto(self, buffer):
            self._count()
            return super().readinto(memoryview(buffer)[:1 << 20])

    monkeypatch.setattr(walarchive, "_open_wal", lambda path: StopMidway(io.FileIO(path), 1 << 20))
    with pytest.raises(Stopped):
        repo.archive_push(write_segment(tmp_path, SEG, size=16 << 20, filled=1.0))
    assert StopMidway.reads < 10, "it read the whole segment before it stopped"
    assert repo.archive_list() == []
    assert not list((tmp_path / "repo0" / "locks").glob("*"))


def test_a_segment_that_is_not_the_one_its_name_says_is_refused(tmp_path, cli, repo_url):
    """A zeroed or recycled segment, one renamed or cut short: exit 22, one line naming why, nothing stored;
    the right file under the name is archived afterwards."""
    right = segment_file(tmp_path / "right", size=1 << 20)
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = {
        "zeroed": bytes(1 << 20),
        "another position": segment_bytes("000000010000000000000007", 1 << 20),
        "cut short": right.read_bytes()[:(1 << 20) - 8192],
        "a later timeline": segment_bytes("00000002" + SEG[8:], 1 << 20),
        "too short": b"\x10\xd1",
    }

    def objects():
        return sorted(str(p) for p in (tmp_path / "repo").rglob("*")
                      if p.is_file() and p.parent.name != "locks" and not p.name.startswith("."))

    before = objects()
    for what, data in cases.items():
        (bad / SEG).write_bytes(data)
        refused = cli("archive-push", "-r", repo_url, str(bad / SEG), check=22)
        lines = refused.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and SEG in lines[0] and "nothing archived" in lines[0], (what, lines)
        assert objects() == before
    (bad / SEG).unlink()
    os.mkfifo(bad / SEG)
    assert "not a regular file" in cli("archive-push", "-r", repo_url, str(bad / SEG), check=2).stderr.decode()
    cli("archive-push", "-r", repo_url, str(right))
    got = tmp_path / "got"
    cli("archive-get", "-r", repo_url, SEG, str(got))
    assert got.read_bytes() == right.read_bytes()


def test_a_segment_of_another_database_system_than_the_one_before_it_is_refused(tmp_path, cli, repo_url):
    """A new initdb, or pg_upgrade (which goes on with the old names), archiving into the repository of the
    old system: exit 22 naming both systems, under a name the old one archived too; the old system's next
    segment is taken, and the new one's once the old WAL before it is expired.  A batch pushed ahead checks
    each file against the one before it."""
    old, new = 6_000_000_000_000_000_001, 7_000_000_000_000_000_002
    first = write_segment(tmp_path / "old", "000000010000000A000000FF", size=16 << 20, system=old)
    cli("archive-push", "-r", repo_url, str(first))
    theirs = write_segment(tmp_path / "new", first.name, size=16 << 20, system=new)  # the same name
    refused = cli("archive-push", "-r", repo_url, str(theirs), check=22).stderr.decode().strip()
    assert refused.endswith(f"give each its own); the archived one is WAL of database system {old}, this one "
                            f"of {new}"), refused
    other = write_segment(tmp_path / "new", "000000010000000B00000000", size=16 << 20, system=new)
    refused = cli("archive-push", "-r", repo_url, str(other), check=22).stderr.decode().strip()
    assert refused == (f"chunkvault: 000000010000000B00000000 is WAL of database system {new}, but "
                       f"000000010000000A000000FF, archived before it, is of system {old}: a repository's WAL "
                       "archive is one system's (after a new initdb or pg_upgrade, archive into a new repository, "
                       "or archive-expire the old system's WAL first); nothing archived")
    assert [w["name"] for w in json.loads(cli("archive-list", "-r", repo_url, "--json").stdout)["files"]] == \
        ["000000010000000A000000FF"]
    same = write_segment(tmp_path / "old", "000000010000000B00000000", size=16 << 20, system=old)
    ahead = [write_segment(tmp_path / "old", "000000010000000B00000001", size=16 << 20, system=new),
             write_segment(tmp_path / "old", "000000010000000B00000002", size=16 << 20, system=old)]
    repo = Repository.open(repo_url, PASSWORD)
    pushed = repo.archive_push(same, ahead=ahead)
    assert pushed.ahead == [] and "000000010000000B00000001 is WAL of database system" in pushed.ahead_error
    cli("archive-expire", "-r", repo_url, "--before", "000000010000000B00000001")
    cli("archive-push", "-r", repo_url, str(ahead[0]))  # nothing of the old system before it now


def test_a_segment_of_an_old_timeline_copied_under_a_later_ones_name_is_refused(tmp_path, cli, repo_url):
    """A promotion's first segment starts with the old timeline's pages, up to where it ended (the history
    file): taken.  The old timeline's earlier or later segment under the new name: exit 22."""
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/3000120\tno recovery target specified\n")
    cli("archive-push", "-r", repo_url, str(history))
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    for old, new in (("000000010000000000000003", "000000020000000000000003"),
                     ("000000010000000000000005", "000000020000000000000005"),
                     ("000000010000000000000002", "000000020000000000000002")):
        (wal / new).write_bytes(segment_bytes(old, 16 << 20))
    cli("archive-push", "-r", repo_url, str(wal / "000000020000000000000003"))
    refused = cli("archive-push", "-r", repo_url, str(wal / "000000020000000000000002"), check=22)
    assert refused.stderr.decode().strip() == (
        "chunkvault: 000000020000000000000002 starts with a page of timeline 1, which ended after it, at 0/3000120 "
        "(00000002.history): a segment of timeline 1 copied under a later timeline's name?; nothing archived")
    refused = cli("archive-push", "-r", repo_url, str(wal / "000000020000000000000005"), check=22)
    assert refused.stderr.decode().strip() == (
        "chunkvault: 000000020000000000000005 starts with a page of timeline 1, which ended before it, at 0/3000120 "
        "(00000002.history): a segment of timeline 1 copied under a later timeline's name?; nothing archived")
    cli("archive-push", "-r", repo_url, str(write_segment(wal, "000000020000000000000004", size=16 << 20)))


def test_a_segment_that_fails_to_read_is_an_error_naming_it(tmp_path, cli, repo_url):
    """An I/O error while reading (here /proc/self/mem, whose first page is not mapped: EIO) is one line
    naming the file, exit 2, not an internal error."""
    seg = tmp_path / SEG
    seg.symlink_to("/proc/self/mem")
    failed = cli("archive-push", "-r", repo_url, str(seg), check=2).stderr.decode().strip()
    assert failed == f"chunkvault: cannot read {seg}: Input/output error"
    assert cli("archive-list", "-r", repo_url).stdout.decode().count(SEG) == 0


def test_the_segment_before_a_name():
    from chunkvault.store.walheader import previous_segment

    assert previous_segment("000000030000000100000000", 16 << 20) == "0000000300000000000000FF"
    assert previous_segment("000000030000000100000000", 1 << 20) == "000000030000000000000FFF"
    assert previous_segment("000000030000000100000002.partial", 1 << 30) == "000000030000000100000001"
    assert previous_segment("000000030000000100000000", 1 << 30) == "000000030000000000000003"
    assert previous_segment("000000030000000000000000", 16 << 20) is None


@given(st.binary(min_size=0, max_size=64), st.sampled_from([1 << 20, 16 << 20, 1 << 30, 12345]), segments)
def test_the_header_check_takes_only_a_header_that_names_the_segment(head, size, segment):
    from chunkvault.store.walheader import check_segment

    try:
        header = check_segment(segment, head, size)
    except WalHeaderMismatch as exc:
        assert str(exc).startswith(segment) and "nothing archived" in str(exc)
        return
    assert header.segment_size == size and header.start == (int(segment[8:16], 16) << 32) + int(segment[16:], 16) * size


@given(st.sampled_from([1 << 20, 16 << 20, 1 << 30]), st.integers(1, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF),
       st.integers(0, 4095), st.sampled_from([None, "position", "size", "timeline", "flag"]), st.sampled_from("<>"))
def test_a_header_is_taken_exactly_when_it_is_the_named_segments(size, tli, log, seg, wrong, order):
    import struct

    from chunkvault.store.walheader import check_segment

    seg %= (1 << 32) // size
    name = f"{tli:08X}{log:08X}{seg:08X}"
    start = (log << 32) + seg * size
    fields = {"info": 0x0002, "tli": tli, "pageaddr": start, "seg_size": size}
    if wrong == "position":
        fields["pageaddr"] = (start + size) % (1 << 64)
    elif wrong == "size":
        fields["seg_size"] = size * 2 if size < 1 << 30 else size // 2
    elif wrong == "timeline":
        name = f"{tli - 1:08X}{log:08X}{seg:08X}"
    elif wrong == "flag":
        fields["info"] = 0x0001
    head = struct.pack(order + "HHIQI4xQII", 0xD110, fields["info"], fields["tli"], fields["pageaddr"], 0, 42,
                       fields["seg_size"], 8192)
    if wrong is None:
        header = check_segment(name, head, size)
        assert (header.timeline, header.start, header.system, header.segment_size) == (tli, start, 42, size)
    else:
        with pytest.raises(WalHeaderMismatch):
            check_segment(name, head, size)


@pytest.mark.parametrize("order", ["<", ">"])
def test_the_header_check_reads_a_segment_of_either_byte_order(order):
    import struct

    from chunkvault.store.walheader import check_segment

    name = "00000003000000A7000000C1"
    size = 16 << 20
    head = struct.pack(order + "HHIQI4xQII", 0xD116, 0x0006, 2, (0xA7 << 32) + 0xC1 * size, 17, 12345, size, 8192)
    header = check_segment(name + ".partial", head, size)
    assert (header.timeline, header.start, header.system, header.segment_size) == (2, (0xA7 << 32) + 0xC1 * size,
                                                                                   12345, size)
    with pytest.raises(WalHeaderMismatch, match="0/C1000000"):
        check_segment("000000030000000000000001", head[:8] + struct.pack(order + "Q", 0xC1000000) + head[16:],
                      size)


def test_a_segment_of_a_server_that_aligns_8_byte_integers_to_4_is_archived(tmp_path, new_repo):
    """On 32-bit x86 the page header has no padding before the system identifier (its 8-byte integers are
    aligned to 4 bytes): each segment of such a server was refused as no WAL, and its archiving stalled."""
    import struct

    from chunkvault.store.walheader import check_segment

    size, system = 1 << 20, 6_543_210_987_654_321_000
    repo = new_repo()
    wal = tmp_path / "pg_wal"
    wal.mkdir()
    for seg in (1, 2):
        name = f"0000000100000000{seg:08X}"
        head = struct.pack("<HHIQIQII", 0xD116, 0x0002, 1, seg * size, 0, system, size, 8192)
        (wal / name).write_bytes(head + random.Random(seg).randbytes(8192) + bytes(size - len(head) - 8192))
        assert check_segment(name, head + bytes(4), size).system == system
        repo.archive_push(wal / name)
    other = struct.pack("<HHIQIQII", 0xD116, 0x0002, 1, 3 * size, 0, system + 1, size, 8192)
    (wal / "000000010000000000000003").write_bytes(other + bytes(size - len(other)))
    with pytest.raises(WalHeaderMismatch, match=f"but 000000010000000000000002, archived before it, is of system "
                                                f"{system}"):
        repo.archive_push(wal / "000000010000000000000003")


def test_check_and_get_refuse_a_size_the_blobs_do_not_hold(tmp_path, new_repo):
    """An object whose size disagrees with its blobs (a writer's bug: the seal is intact) writes nothing."""
    repo = new_repo()
    repo.archive_push(segment_file(tmp_path, size=1 << 20))
    [w] = repo.archive_list()
    w.size += 1
    repo.store.remote.delete(f"wal/{SEG}")
    repo.store.remote.put(f"wal/{SEG}", w.encode(repo.store.sealer))
    report = repo.check()
    assert [p.object for p in report.problems] == [f"wal/{SEG}"]
    assert "records a size of" in report.problems[0].problem
    with pytest.raises(CorruptObject, match="records"):
        repo.archive_get(SEG, tmp_path / "got")
    assert not (tmp_path / "got").exists()


def test_expiring_before_the_oldest_snapshot_keeps_what_each_snapshot_s_recovery_needs(tmp_path, password):
    """Two copies whose backup_label start in segments 2 and 4 (and a source with no label): ``oldest-snapshot``
    removes segment 1 only; once the older copy is forgotten, up to segment 3."""
    repo = Repository.init(str(tmp_path / "repo"), password, kdf_seconds=0)
    for i in range(1, 6):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))
    copy, etc = tmp_path / "copy", tmp_path / "etc"
    copy.mkdir()
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    repo.backup([str(etc)])

    def label(seg: str) -> None:
        (copy / "backup_label").write_text(f"START WAL LOCATION: 0/{seg[-1]}000028 (file {seg})\n"
                                           "CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n")

    label("000000010000000000000002")
    first = repo.backup([str(copy)], kind="full").snapshot
    label("000000010000000000000004")
    repo.backup([str(copy)])
    assert repo.archive_expire("oldest-snapshot", dry_run=True) == ["000000010000000000000001"]
    repo.forget([first.id])
    assert repo.archive_expire("oldest-snapshot") == ["000000010000000000000001", "000000010000000000000002",
                                                      "000000010000000000000003"]
    assert [w.name for w in repo.archive_list()] == ["000000010000000000000004", "000000010000000000000005"]
    repo.close()


def test_a_tar_format_copy_keeps_its_wal_by_the_label_in_its_base_tar_or_else_by_its_manifest(tmp_path, password):
    """``pg_basebackup -Ft`` writes the label inside base.tar (first), and a manifest beside it: a copy taken
    so lost its WAL to ``oldest-snapshot``.  A base.tar compressed so that it cannot be read (zstd) falls back
    on the manifest's first WAL range, named as with 1 GiB segments (keeping more, never less)."""
    import io
    import tarfile

    repo = Repository.init(str(tmp_path / "repo"), password, kdf_seconds=0)
    for i in range(1, 7):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))

    def tar_copy(path, seg: int, suffix: str):
        path.mkdir(parents=True)
        label = f"START WAL LOCATION: 0/{seg}000028 (file 00000001000000000000000{seg})\n".encode()
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w:gz" if suffix == ".tar.gz" else "w") as tar:
            for name, data in (("backup_label", label), ("PG_VERSION", b"15\n")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        (path / f"base{suffix}").write_bytes(raw.getvalue() if suffix != ".tar.zst" else b"(zstd) " + raw.getvalue())
        (path / "pg_wal.tar").write_bytes(b"")
        (path / "backup_manifest").write_text(json.dumps({"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
                                                          "WAL-Ranges": [{"Timeline": 1, "Start-LSN": f"0/{seg}000028",
                                                                          "End-LSN": f"0/{seg}000100"}]}))

    tar_copy(tmp_path / "a", 4, ".tar")
    tar_copy(tmp_path / "b", 5, ".tar.gz")
    for copy in ("a", "b"):
        repo.backup([str(tmp_path / copy)])
    assert sorted(repo._label_starts(repo.snapshots())) == ["000000010000000000000004", "000000010000000000000005"]
    tar_copy(tmp_path / "c", 3, ".tar.zst")
    repo.backup([str(tmp_path / "c")])
    assert "000000010000000000000000" in repo._label_starts(repo.snapshots())  # 0/3000028 within the first GiB
    assert repo.archive_expire("oldest-snapshot", dry_run=True) == []
    repo.close()


@pytest.mark.parametrize("suffix", [".tar.lz4", ".tar.zst"])
def test_a_compressed_tar_copy_without_manifest_stops_the_expiry_instead_of_losing_its_wal(tmp_path, password,
                                                                                          suffix):
    """``pg_basebackup -Ft -Z lz4 --no-manifest`` (or zstd): the label is inside a base.tar this cannot read
    and no manifest says the start; taken for a snapshot of something else, the copy's WAL was expired."""
    repo = Repository.init(str(tmp_path / "repo"), password, kdf_seconds=0)
    for i in range(1, 5):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))
    old = tmp_path / "old"
    old.mkdir()
    (old / f"base{suffix}").write_bytes(b"(compressed) backup_label START WAL LOCATION")
    (old / "pg_wal.tar").write_bytes(b"")
    repo.backup([str(old)])
    new = tmp_path / "new"
    new.mkdir()
    (new / "backup_label").write_text("START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n")
    repo.backup([str(new)])
    with pytest.raises(UsageError, match=f"base{re.escape(suffix)}, no backup_manifest.*--before SEGMENT"):
        repo.archive_expire("oldest-snapshot", dry_run=True)
    with pytest.raises(UsageError):
        repo.archive_expire("oldest-snapshot")
    assert len(repo.archive_list()) == 4
    repo.close()


def test_a_snapshot_that_lands_while_expiry_waits_for_its_lock_keeps_its_wal(tmp_path, password, monkeypatch):
    """The labels are read under the shared lock, the objects deleted under the exclusive one: a copy of an
    older base backup landing between the two (from another repository, with its data) kept segment 2 only
    by chance; the start is now decided again under the exclusive lock."""
    from chunkvault.store import walarchive

    repo = Repository.init(str(tmp_path / "repo"), password, kdf_seconds=0)
    for i in range(1, 6):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "backup_label").write_text("START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\n")
    repo.backup([str(copy)])
    other = Repository.init(str(tmp_path / "other"), password, kdf_seconds=0)
    (copy / "backup_label").write_text("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n")
    (copy / "base").write_bytes(random.Random(5).randbytes(300_000))  # data the repository does not have
    older = other.backup([str(copy)]).snapshot
    expire = walarchive.expire

    def landing(store, before, **kwargs):
        other.copy_to(repo, [older.id])
        return expire(store, before, **kwargs)

    monkeypatch.setattr(walarchive, "expire", landing)
    assert repo.archive_expire("oldest-snapshot") == ["000000010000000000000001"]
    monkeypatch.undo()
    assert len(repo.snapshots()) == 2
    other.close()
    repo.close()


def test_expiring_before_the_oldest_snapshot_finds_labels_below_a_snapshot_s_root(tmp_path, password):
    """A copy backed up with its configuration (two paths), or through the directory above it: its label is
    not at the snapshot's root, and its WAL stays all the same."""
    repo = Repository.init(str(tmp_path / "repo"), password, kdf_seconds=0)
    for i in range(1, 7):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))

    def copy_at(path, seg: str):
        path.mkdir(parents=True)
        (path / "backup_label").write_text(f"START WAL LOCATION: 0/{seg[-1]}000028 (file {seg})\n")
        (path / "PG_VERSION").write_text("15\n")
        return path

    etc = tmp_path / "etc-pg"
    etc.mkdir()
    (etc / "postgresql.conf").write_text("port = 5432\n")
    (etc / "backup_label").write_text("not a label\n")  # a file so named, no base backup's: not counted
    old = copy_at(tmp_path / "old" / "copy", "000000010000000000000002")
    repo.backup([str(old), str(etc)], time="2026-12-01T00:00:00Z")
    copy_at(tmp_path / "pg" / "copy", "000000010000000000000004")
    repo.backup([str(tmp_path / "pg")], time="2026-12-02T00:00:00Z")
    assert sorted(repo._label_starts(repo.snapshots())) == ["000000010000000000000002", "000000010000000000000004"]
    assert repo.archive_expire("oldest-snapshot") == ["000000010000000000000001"]
    repo.close()


def test_expiring_before_the_oldest_snapshot_takes_the_earlier_timelines_too(tmp_path, password, cli):
    """After a promotion every snapshot is on the new timeline, whose recovery never reads the old one's
    segments: oldest-snapshot kept them all, for good, after each failover.  A timeline of a kept snapshot
    keeps what that snapshot needs; an explicit --before SEGMENT still takes its own timeline only."""
    url = str(tmp_path / "repo")
    repo = Repository.init(url, password, kdf_seconds=0)
    old = [f"00000001000000000000000{i}" for i in range(1, 5)] + ["000000010000000000000005.partial"]
    new = [f"00000002000000000000000{i}" for i in range(5, 9)]
    for i, name in enumerate([*old, *new]):
        repo.archive_push(segment_file(tmp_path, name, seed=i, size=1 << 20))
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/5000100\tno recovery target specified\n")
    repo.archive_push(history)
    copy = tmp_path / "copy"
    copy.mkdir()

    def snapshot(seg: str) -> str:
        (copy / "backup_label").write_text(f"START WAL LOCATION: 0/{seg[-1]}000028 (file {seg})\n")
        return repo.backup([str(copy)], kind="full").snapshot.id

    first = snapshot("000000010000000000000003")
    snapshot("000000020000000000000007")
    assert repo.archive_expire("oldest-snapshot", dry_run=True) == old[:2]  # the first one's timeline is the oldest
    repo.forget([first])
    out = json.loads(cli("archive-expire", "-r", url, "--before", "oldest-snapshot", "--json",
                         env={"CHUNKVAULT_PASSWORD": password}).stdout)
    assert out["removed"] == [*old, new[0], new[1]]
    assert [w.name for w in repo.archive_list()] == ["00000002.history", *new[2:]]
    repo.archive_push(segment_file(tmp_path, old[0], seed=0, size=1 << 20))
    assert repo.archive_expire(new[3]) == [new[2]]  # a segment given: its timeline only
    assert old[0] in [w.name for w in repo.archive_list()]
    repo.close()


def test_expiring_before_the_oldest_snapshot_refuses_while_a_snapshot_does_not_load(tmp_path, password, cli):
    """A snapshot left out of the listing (damaged, or a newer chunkvault's: hosts sharing a repository upgrade
    one at a time) may be the oldest: its WAL was expired as if it were not there, prune then freed it."""
    url = str(tmp_path / "repo")
    repo = Repository.init(url, password, kdf_seconds=0)
    for i in range(1, 6):
        repo.archive_push(segment_file(tmp_path, f"00000001000000000000000{i}", seed=i, size=1 << 20))
    copy = tmp_path / "copy"
    copy.mkdir()
    for seg in ("000000010000000000000002", "000000010000000000000004"):
        (copy / "backup_label").write_text(f"START WAL LOCATION: 0/{seg[-1]}000028 (file {seg})\n")
        repo.backup([str(copy)], kind="full")
    oldest = repo.snapshots()[0].id
    victim = tmp_path / "repo" / "snapshots" / oldest
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    with pytest.raises(CorruptObject, match="archive-expire --before oldest-snapshot needs every snapshot"):
        repo.archive_expire("oldest-snapshot", dry_run=True)
    out = cli("archive-expire", "-r", url, "--before", "oldest-snapshot", check=13)
    assert oldest[:8] in out.stderr.decode() and "needs every snapshot" in out.stderr.decode()
    assert len([w.name for w in repo.archive_list()]) == 5
    assert cli("archive-expire", "-r", url, "--before", "000000010000000000000002").returncode == 0
    repo.close()


def test_expiring_before_the_oldest_snapshot_needs_a_snapshot_with_a_label(tmp_path, password, cli):
    repo = Repository.init(str(tmp_path / "repo"), password, kdf_seconds=0)
    repo.archive_push(segment_file(tmp_path, SEG, size=1 << 20))
    src = tmp_path / "src"
    src.mkdir()
    (src / "backup_label").write_text("not a label\n")
    repo.backup([str(src)])
    with pytest.raises(UsageError, match="no snapshot holds a base backup's label"):
        repo.archive_expire("oldest-snapshot")
    out = cli("archive-expire", "-r", str(tmp_path / "repo"), "--before", "oldest-snapshot", check=2)
    assert len(out.stderr.decode().splitlines()) == 1
    assert [w.name for w in repo.archive_list()] == [SEG]
    repo.close()


def test_copy_wal_sends_the_archived_files_the_destination_lacks(tmp_path, password, cli):
    src_url, dst_url = str(tmp_path / "src"), str(tmp_path / "dst")
    src = Repository.init(src_url, password, kdf_seconds=0)
    dst = Repository.init(dst_url, password, kdf_seconds=0)
    names = [f"00000001000000000000000{i}" for i in (1, 2, 3)]
    for i, name in enumerate(names):
        src.archive_push(segment_file(tmp_path, name, seed=i, size=1 << 20))
    history = tmp_path / "00000002.history"
    history.write_text("1\t0/3000000\tno recovery target specified\n")
    src.archive_push(history)
    dst.archive_push(tmp_path / names[0])  # pushed there too (two archive_command pushes)
    assert src.copy_to(dst).wal_copied == []  # not asked for
    out = json.loads(cli("copy", "-r", src_url, "--to", dst_url, "--wal", "--json",
                         env={"CHUNKVAULT_TO_PASSWORD": password}).stdout)
    assert (out["wal_copied"], out["wal_skipped"], out["wal_failed"]) == (names[1:] + ["00000002.history"], 1, [])
    for name in [*names, "00000002.history"]:
        dst.archive_get(name, tmp_path / "got")
        original = history if name.endswith(".history") else tmp_path / name
        assert (tmp_path / "got").read_bytes() == original.read_bytes()
    assert dst.check(read_data=True).ok
    again = src.copy_to(dst, wal=True)
    assert (again.wal_copied, again.wal_skipped, again.blobs_sent) == ([], 4, 0)
    # A damaged object in the source: the others still go, and the command says which did not (exit 13).
    src.archive_push(segment_file(tmp_path, "000000010000000000000004", seed=9, size=1 << 20))
    src.archive_push(segment_file(tmp_path, "000000010000000000000005", seed=10, size=1 << 20))
    victim = tmp_path / "src" / "wal" / "000000010000000000000004"
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    bad = cli("copy", "-r", src_url, "--to", dst_url, "--wal", check=13, env={"CHUNKVAULT_TO_PASSWORD": password})
    err = bad.stderr.decode()
    assert "not copied wal/000000010000000000000004" in err and "1 archived WAL file(s) not copied" in err
    assert "000000010000000000000005" in [w.name for w in dst.archive_list()]
    src.close()
    dst.close()


def archive_and_destination(tmp_path, password, count: int):
    """A repository archiving segments 1 to ``count`` of timeline 1, an empty one to copy into, the names,
    and an empty directory to make base backup copies in."""
    src = Repository.init(str(tmp_path / "src"), password, kdf_seconds=0)
    dst = Repository.init(str(tmp_path / "dst"), password, kdf_seconds=0)
    names = [f"00000001000000000000000{i}" for i in range(1, count + 1)]
    for i, name in enumerate(names):
        src.archive_push(segment_file(tmp_path, name, seed=i, size=1 << 20))
    copy = tmp_path / "copy"
    copy.mkdir()
    return src, dst, names, copy


def test_copy_wal_does_not_send_again_what_the_destination_expired(tmp_path, password):
    """The destination's ``archive-expire --before oldest-snapshot`` removed the WAL before its oldest base
    backup: each later ``copy --wal`` sent it all again.  Only what a base backup there can use goes; an older
    base backup copied later brings its WAL, and a destination with no base backup, or one that does not
    load, gets everything."""
    src, dst, names, copy = archive_and_destination(tmp_path, password, 6)

    def base_backup(seg: str) -> str:
        (copy / "backup_label").write_text(f"START WAL LOCATION: 0/{seg[-1]}000028 (file {seg})\n")
        return src.backup([str(copy)], kind="full").snapshot.id

    older, newer = base_backup(names[1]), base_backup(names[3])
    first = src.copy_to(dst, [older], wal=True)  # nothing there before the copied snapshot lands
    assert (first.wal_copied, first.wal_unneeded) == (names[1:], 1)
    assert src.copy_to(dst, [newer], wal=True).wal_copied == []
    dst.forget([dst.snapshots()[0].id])
    assert dst.archive_expire("oldest-snapshot") == names[1:3]
    again = src.copy_to(dst, [newer], wal=True)
    assert (again.wal_copied, again.wal_skipped, again.wal_unneeded, again.blobs_sent) == ([], 3, 3, 0)
    # A start recorded in the stats (`backup --postgres`) counts before any label.
    there = dst.snapshots()[0]
    dst.store.save_snapshot(dataclasses.replace(there, stats={**there.stats, "postgres": {"start_wal": names[2]}}),
                            replace=True)
    assert src.copy_to(dst, [newer], wal=True).wal_copied == [names[2]]
    assert src.copy_to(dst, wal=True).wal_copied == [names[1]]  # the older snapshot goes there again
    (tmp_path / "dst" / "snapshots" / dst.snapshots()[0].id).write_bytes(b"damaged")  # the older one
    dst.archive_expire(names[4])
    with pytest.warns(RepositoryStateWarning, match="unreadable"):
        assert src.copy_to(dst, [newer], wal=True).wal_copied == names[:4]
    src.close()
    dst.close()


def test_copy_wal_to_a_destination_whose_base_backup_does_not_read_sends_everything(tmp_path, password):
    """A destination snapshot whose tree (or backup_label) is damaged: its start cannot be read, so every file
    it lacks goes, as with a snapshot that does not load; the copy failed on it, and sent no WAL at all."""
    src, dst, names, copy = archive_and_destination(tmp_path, password, 4)
    (copy / "backup_label").write_text(f"START WAL LOCATION: 0/3000028 (file {names[2]})\n")
    older = src.backup([str(copy)], kind="full").snapshot.id
    assert src.copy_to(dst, [older], wal=True).wal_unneeded == 2
    for pack in (tmp_path / "dst" / "data").rglob("*"):
        if pack.is_file():
            raw = bytearray(pack.read_bytes())
            raw[len(raw) // 2] ^= 1
            pack.write_bytes(bytes(raw))
    (copy / "backup_label").write_text(f"START WAL LOCATION: 0/4000028 (file {names[3]})\n")
    newer = src.backup([str(copy)], kind="full").snapshot.id
    dst.close()
    dst = Repository.open(str(tmp_path / "dst"), password)
    result = src.copy_to(dst, [newer], wal=True)
    assert (result.wal_copied, result.wal_unneeded) == (names[:2], 0)
    src.close()
    dst.close()


def test_a_file_archived_while_a_copy_runs_is_sent_not_called_damaged(tmp_path, password):
    """archive_command runs on while a copy does (a scheduled run's postgres backup makes the server switch
    segments): the copy listed the new object but had read the index before the push wrote its own, and
    called the file's blobs missing, exit 13, pointing at `repair index`."""
    import subprocess
    import sys

    src_url = str(tmp_path / "src")
    src = Repository.init(src_url, password, kdf_seconds=0)
    dst = Repository.init(str(tmp_path / "dst"), password, kdf_seconds=0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(random.Random(4).randbytes(1 << 20))
    src.backup([str(data)])
    seg = segment_file(tmp_path, SEG, size=1 << 20)
    pushed = []

    def progress(*_):  # during the copy, once its index is loaded: another process archives
        if not pushed:
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")},
                   "CHUNKVAULT_PASSWORD": password}
            pushed.append(subprocess.run([sys.executable, "-m", "chunkvault.cli", "archive-push", "-q", "-r",
                                          src_url, str(seg)], env=env).returncode)

    result = src.copy_to(dst, wal=True, progress=progress)
    assert pushed == [0] and result.wal_failed == [] and result.wal_copied == [SEG]
    dst.archive_get(SEG, tmp_path / "got")
    assert (tmp_path / "got").read_bytes() == seg.read_bytes()
    src.close()
    dst.close()


@pytest.mark.parametrize("same_chunker", [True, False])
def test_copy_wal_names_a_file_the_destination_archived_with_other_content(tmp_path, password, cli, same_chunker,
                                                                          monkeypatch):
    """A name both archived (a second ``archive_command``, a stray server): the same bytes are already there,
    other ones are a failure naming it (exit 13), whether or not the two repositories chunk alike."""
    src_url, dst_url = str(tmp_path / "src"), str(tmp_path / "dst")
    src = Repository.init(src_url, password, kdf_seconds=0)
    dst = Repository.init(dst_url, password, kdf_seconds=0, copy_chunker_from=src if same_chunker else None)
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    names = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003"]
    for i, name in enumerate(names):
        src.archive_push(segment_file(mine, name, seed=i, size=1 << 20))
    dst.archive_push(mine / names[0])  # the same bytes, pushed there on its own
    dst.archive_push(segment_file(theirs, names[1], seed=7, size=1 << 20))  # as many bytes, other ones
    dst.archive_push(segment_file(theirs, names[2], seed=8, size=2 << 20))  # another size
    run = cli("copy", "-r", src_url, "--to", dst_url, "--wal", "--json", check=13,
              env={"CHUNKVAULT_TO_PASSWORD": password})
    out = json.loads(run.stdout)
    assert (out["wal_copied"], out["wal_skipped"]) == ([], 1)
    failed = {f["name"]: f["reason"] for f in out["wal_failed"]}
    assert sorted(failed) == names[1:]
    assert all("the destination archived other content under this name" in r for r in failed.values()), failed
    assert "other content" in run.stderr.decode().splitlines()[-1]
    src.archive_push(segment_file(mine, "000000010000000000000004", seed=4, size=1 << 20))
    assert src.copy_to(dst, wal=True).wal_copied == ["000000010000000000000004"]
    from chunkvault.store import walarchive

    read = []
    plaintexts = walarchive.plaintexts
    monkeypatch.setattr(walarchive, "plaintexts", lambda repo, w: read.append(w.name) or plaintexts(repo, w))
    again = src.copy_to(dst, wal=True)  # one a copy wrote (its time and host kept) is known without reading
    assert again.wal_skipped == 2 and [n for n, _ in again.wal_failed] == names[1:]
    assert set(read) == set(names[:2])  # those pushed there on their own, of the same size
    src.close()
    dst.close()


def test_archive_push_records_chunkvault_host(tmp_path, cli, repo_url):
    cli("archive-push", "-r", repo_url, str(segment_file(tmp_path, SEG, size=1 << 20)), env={"CHUNKVAULT_HOST": "db-7"})
    [entry] = json.loads(cli("archive-list", "-r", repo_url, "--json").stdout)["files"]
    assert entry["host"] == "db-7"


# --- pushing ahead with a spool ------------------------------------------------------------------------------


def test_ready_ahead_takes_history_files_first_then_by_name_up_to_the_limit():
    ready = ["000000020000000000000004", "00000002.history", "000000020000000000000003", "xlogtemp.123",
             "000000020000000000000002", "000000020000000000000003.00000028.backup"]
    assert ready_ahead(ready, "000000020000000000000002", 3) == [
        "00000002.history", "000000020000000000000003", "000000020000000000000003.00000028.backup"]
    assert ready_ahead(ready, "000000020000000000000002", 0) == []


def pg_wal_with_ready(tmp_path, count, size=1 << 20):
    """A ``pg_wal`` as PostgreSQL leaves it for its archiver: segments, each with its ``.ready`` status."""
    wal = tmp_path / "pg_wal"
    (wal / "archive_status").mkdir(parents=True)
    names = [f"0000000100000000000000{i:02X}" for i in range(1, count + 1)]
    for i, name in enumerate(names):
        segment_file(wal, name, seed=i, size=size)
        (wal / "archive_status" / f"{name}.ready").touch()
    return wal, names


def archived_as_postgresql_would(wal, name):
    """What PostgreSQL does once ``archive_command`` succeeded for ``name``."""
    os.rename(wal / "archive_status" / f"{name}.ready", wal / "archive_status" / f"{name}.done")


def test_a_spool_push_archives_the_ready_files_ahead_and_answers_for_them_without_the_repository(
        tmp_path, cli, repo_url):
    wal, names = pg_wal_with_ready(tmp_path, 5)
    spool = tmp_path / "spool"
    push = ("archive-push", "-r", repo_url, "--spool", str(spool), "--batch", "3")
    first = json.loads(cli(*push, str(wal / names[0]), "--json").stdout)
    assert [first["name"], *(r["name"] for r in first["ahead"])] == names[:3] and first["ahead_error"] is None
    assert sorted(os.listdir(spool)) == [f"{n}.ok" for n in names[1:3]]
    archived_as_postgresql_would(wal, names[0])
    for name in names[1:3]:  # answered by the marker: a wrong password would fail any opening of the repository
        out = cli(*push, str(wal / name), password="wrong")
        assert "pushed ahead" in out.stdout.decode()
        archived_as_postgresql_would(wal, name)
    assert os.listdir(spool) == []
    last = cli(*push, str(wal / names[3])).stdout.decode()
    assert names[3] in last and names[4] in last
    for name in names:
        got = tmp_path / "got"
        cli("archive-get", "-r", repo_url, name, str(got))
        assert got.read_bytes() == (wal / name).read_bytes()


def test_a_marker_answers_only_for_its_repository_and_the_file_as_it_was_pushed(tmp_path, cli, repo_url):
    wal, names = pg_wal_with_ready(tmp_path, 3)
    spool = tmp_path / "spool"
    cli("archive-push", "-r", repo_url, "--spool", str(spool), str(wal / names[0]))
    other = str(tmp_path / "other")
    cli("init", "-r", other, "--kdf-time", "0")
    moved = cli("archive-push", "-r", other, "--spool", str(spool), str(wal / names[1])).stdout.decode()
    assert f"archived {names[1]}" in moved  # pushed into the other repository for real, not taken as done
    segment_file(wal, names[2], seed=99, size=1 << 20)  # not the file pushed ahead any more
    again = cli("archive-push", "-r", repo_url, "--spool", str(spool), str(wal / names[2]), check=22)
    assert "archived already" in again.stderr.decode()


def test_a_file_ahead_that_fails_ends_the_batch_and_not_the_push(tmp_path, cli, repo_url):
    wal, names = pg_wal_with_ready(tmp_path, 4)
    cli("archive-push", "-r", repo_url, str(wal / names[2]))
    segment_file(wal, names[2], seed=99, size=1 << 20)  # other content under an archived name
    spool = tmp_path / "spool"
    out = cli("archive-push", "-r", repo_url, "--spool", str(spool), "--json", str(wal / names[0]))
    result = json.loads(out.stdout)
    assert [r["name"] for r in result["ahead"]] == [names[1]]
    assert result["ahead_error"].startswith(f"{names[2]}: ") and "other content" in result["ahead_error"]
    assert sorted(os.listdir(spool)) == [f"{names[1]}.ok"]
    text = cli("archive-push", "-r", repo_url, "--spool", str(tmp_path / "spool2"), str(wal / names[0]))
    assert "pushing ahead stopped at" in text.stderr.decode() and f"{names[0]} already archived" in text.stdout.decode()
    cli("archive-push", "-r", repo_url, "--spool", str(spool), str(wal / names[2]), check=22)
    assert f"{names[2]}.ok" not in os.listdir(spool)


def test_stale_markers_are_swept_and_batch_needs_a_spool(tmp_path, cli, repo_url):
    wal, names = pg_wal_with_ready(tmp_path, 2)
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "000000010000000000000009.ok").write_text("{}")  # of a file PostgreSQL no longer has ready
    (spool / f"{names[1]}.ok").write_text("not json")
    cli("archive-push", "-r", repo_url, "--spool", str(spool), str(wal / names[0]))
    assert os.listdir(spool) == [f"{names[1]}.ok"]
    assert json.loads((spool / f"{names[1]}.ok").read_text())["repository"].startswith(repo_url + " ")
    result = cli("archive-push", "-r", repo_url, "--batch", "2", str(wal / names[0]), check=2)
    assert "--batch needs --spool" in result.stderr.decode()


# --- fetching ahead with a spool -----------------------------------------------------------------------------


def test_fetch_ahead_takes_the_next_segments_of_the_timeline():
    archived = ["000000010000000000000001", "000000010000000000000002", "000000010000000000000003.partial",
                "000000010000000000000004", "000000020000000000000003", "00000002.history",
                "000000010000000000000002.00000028.backup", "000000010000000000000005"]
    assert fetch_ahead(archived, "000000010000000000000001", 2) == ["000000010000000000000002",
                                                                    "000000010000000000000004"]
    assert fetch_ahead(archived, "000000020000000000000002", 5) == ["000000020000000000000003"]
    assert fetch_ahead(archived, "00000002.history", 5) == []


def archived_segments(tmp_path, cli, repo_url, count):
    wal, names = pg_wal_with_ready(tmp_path, count)
    for name in names:
        cli("archive-push", "-r", repo_url, str(wal / name))
    restore = tmp_path / "restore"
    restore.mkdir()
    return wal, names, restore / "RECOVERYXLOG"


def test_a_spool_get_fetches_the_next_segments_and_hands_them_out_without_the_repository(tmp_path, cli, repo_url):
    wal, names, dest = archived_segments(tmp_path, cli, repo_url, 5)
    get = ("archive-get", "-r", repo_url, "--spool", str(tmp_path / "spool"), "--prefetch", "3")
    first = json.loads(cli(*get, names[0], str(dest), "--json").stdout)
    assert first["prefetched"] == names[1:4] and first["prefetch_error"] is None
    assert dest.read_bytes() == (wal / names[0]).read_bytes()
    [kept] = (tmp_path / "spool").iterdir()
    for name in names[1:4]:  # a wrong password would fail any opening of the repository
        out = cli(*get, name, str(dest), password="wrong")
        assert "fetched ahead" in out.stdout.decode()
        assert dest.read_bytes() == (wal / name).read_bytes()
        assert sorted(os.listdir(kept)) == [n for n in names[1:4] if n > name]
    assert os.listdir(dest.parent) == ["RECOVERYXLOG"]
    cli(*get, names[4], str(dest))
    assert dest.read_bytes() == (wal / names[4]).read_bytes() and os.listdir(kept) == []


def test_fetched_files_go_to_their_repository_only_and_wait_while_a_newer_timeline_is_tried(
        tmp_path, cli, repo_url):
    wal, names, dest = archived_segments(tmp_path, cli, repo_url, 3)
    spool = str(tmp_path / "spool")
    cli("archive-get", "-r", repo_url, "--spool", spool, names[0], str(dest))
    other = str(tmp_path / "other")
    cli("init", "-r", other, "--kdf-time", "0")
    missing = cli("archive-get", "-r", other, "--spool", spool, names[1], str(dest), check=1)
    assert "is not in the WAL archive" in missing.stderr.decode()
    newer = "00000002" + names[1][8:]  # a recovery asks each position on its newest timeline first
    cli("archive-get", "-r", repo_url, "--spool", spool, newer, str(dest), check=1)
    out = cli("archive-get", "-r", repo_url, "--spool", spool, names[1], str(dest), password="wrong")
    assert "fetched ahead" in out.stdout.decode() and dest.read_bytes() == (wal / names[1]).read_bytes()
    result = cli("archive-get", "-r", repo_url, "--prefetch", "2", names[2], str(dest), check=2)
    assert "--prefetch needs --spool" in result.stderr.decode()


def test_fetching_ahead_lists_the_log_files_it_reads_from_not_the_whole_archive(tmp_path, new_repo):
    """Each archive-get with a spool listed every wal/ object to pick the next segments: with the archive of a
    long-lived server (27,000 segments) a spooled call took longer than one without the spool."""
    repo = new_repo()
    names = ["0000000100000000000000FE", "0000000100000000000000FF", "000000010000000100000000",
             "000000010000000100000001", "000000010000000100000002", "000000010000000200000000"]
    for i, name in enumerate(["000000010000000000000001", "000000020000000100000001", *names]):
        repo.archive_push(segment_file(tmp_path, name, seed=i, size=1 << 20))
    listed: list[str] = []
    remote = repo.store.remote
    real = remote.list

    def recorded(prefix=""):
        listed.append(prefix)
        return real(prefix)

    remote.list = recorded
    spool = tmp_path / "spool"
    spool.mkdir()
    fetched, why = repo.archive_prefetch(names[0], spool, 3)
    assert [w.name for w in fetched] == names[1:4] and why is None
    wal_listings = [p for p in listed if p.startswith("wal/")]
    assert wal_listings == ["wal/0000000100000000", "wal/0000000100000001"], listed
    listed.clear()
    fetched, why = repo.archive_prefetch(names[2], spool, 8)  # up to a log file of which nothing is archived
    assert [w.name for w in fetched] == names[4:] and why is None
    assert [p for p in listed if p.startswith("wal/")] == [f"wal/000000010000000{i}" for i in (1, 2, 3)]
    listed.clear()
    assert repo.archive_prefetch("00000002.history", spool, 8) == ([], None)
    assert not [p for p in listed if p.startswith("wal/")]


def test_a_damaged_file_ahead_ends_the_fetch_and_not_the_get(tmp_path, cli, repo_url):
    wal, names, dest = archived_segments(tmp_path, cli, repo_url, 4)
    objects = tmp_path / "repo" / "wal"
    (objects / names[2]).write_bytes((objects / names[1]).read_bytes())  # sealed under another name
    spool = str(tmp_path / "spool")
    out = cli("archive-get", "-r", repo_url, "--spool", spool, names[0], str(dest), "--json")
    result = json.loads(out.stdout)
    assert result["prefetched"] == [names[1]] and result["prefetch_error"].startswith(f"{names[2]}: ")
    assert dest.read_bytes() == (wal / names[0]).read_bytes()
    cli("archive-get", "-r", repo_url, "--spool", spool, names[1], str(dest))
    damaged = cli("archive-get", "-r", repo_url, "--spool", spool, names[2], str(dest), check=13)
    assert f"wal/{names[2]}" in damaged.stderr.decode()
    assert dest.read_bytes() == (wal / names[1]).read_bytes()


def test_archive_get_json_gives_a_destination_that_is_not_utf8_exactly(tmp_path, cli, repo_url):
    """``dest`` as every name in JSON: its UTF-8 reading in every locale, with its bytes in ``dest_b64`` when
    it is not UTF-8 (it was lone surrogates in the C locale, and no ``_b64``)."""
    import base64

    wal, names, _ = archived_segments(tmp_path, cli, repo_url, 2)
    for name in (b"caf\xc3\xa9", b"caf\xe9"):
        dest = os.path.join(os.fsencode(tmp_path), name)
        out = json.loads(cli("archive-get", "-r", repo_url, names[0], os.fsdecode(dest), "--json",
                             env={"LC_ALL": "C", "PYTHONUTF8": "0"}).stdout)
        assert out["dest"] == dest.decode("utf-8", "surrogateescape")
        assert base64.b64decode(out.get("dest_b64", "")) == (b"" if name == b"caf\xc3\xa9" else dest)
        assert open(dest, "rb").read() == (wal / names[0]).read_bytes()


def test_sigquit_stops_archive_get_without_leaving_a_temporary_file(tmp_path, cli, repo_url):
    """PostgreSQL's immediate shutdown sends its restore command SIGQUIT: by default that ended it where it
    stood, and a partly written temporary file stayed in pg_wal for good."""
    import subprocess
    import sys

    seg = segment_file(tmp_path, size=1 << 20)
    cli("archive-push", "-r", repo_url, str(seg))
    pg_wal = tmp_path / "pg_wal"
    pg_wal.mkdir()
    program = f"""
import os, signal, sys, time
import chunkvault.store.walarchive as walarchive
def write_blobs(repo, wal, out):
    out.write(b"part of a segment")
    out.flush()
    os.kill(os.getpid(), signal.SIGQUIT)
    time.sleep(30)
walarchive._write_blobs = write_blobs
from chunkvault.console import main
sys.argv = ["chunkvault", "archive-get", "-r", {repo_url!r}, {SEG!r}, {str(pg_wal / "RECOVERYXLOG")!r}]
sys.exit(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60, env=env)
    assert proc.returncode == 131 and proc.stderr.strip() == b"chunkvault: quit", proc.stderr
    assert os.listdir(pg_wal) == [] and os.listdir(tmp_path / "repo" / "locks") == []


def test_a_spool_that_cannot_be_listed_after_the_get_does_not_fail_it(tmp_path, cli, repo_url):
    """The file was in place, then the spool's sweep failed with an internal error (exit 1): PostgreSQL takes
    that for a file not archived and ends the recovery there."""
    import subprocess
    import sys

    wal, names, dest = archived_segments(tmp_path, cli, repo_url, 3)
    spool = tmp_path / "spool"
    program = f"""
import os, sys
import chunkvault.walspool as walspool
listdir = os.listdir
def refused(path="."):
    if "get-" in os.fspath(path):
        raise PermissionError(13, "Permission denied", path)
    return listdir(path)
walspool.os.listdir = refused
from chunkvault.console import main
sys.exit(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    for name in names[:2]:  # from the repository, then from the spool
        proc = subprocess.run([sys.executable, "-c", program, "archive-get", "-r", repo_url, "--spool", str(spool),
                               name, str(dest)], capture_output=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert dest.read_bytes() == (wal / name).read_bytes()
    # the listing of the files ahead fails (the remote gone once the file was fetched): a warning, as for a file
    unlisted = program.replace("walspool.os.listdir = refused", """walspool.os.listdir = refused
import chunkvault.store.walarchive as walarchive
from chunkvault.errors import RemoteUnavailable
def names(repo, start="", **_):
    raise RemoteUnavailable("the storage went away")
walarchive.names = names""")
    shutil.rmtree(spool)  # the file comes from the repository
    proc = subprocess.run([sys.executable, "-c", unlisted, "archive-get", "-r", repo_url, "--spool", str(spool),
                           names[2], str(dest)], capture_output=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert b"fetching ahead stopped" in proc.stderr and b"the storage went away" in proc.stderr
    assert dest.read_bytes() == (wal / names[2]).read_bytes()


def test_markers_and_fetched_files_answer_for_the_repository_made_at_that_address_alone(tmp_path, cli, repo_url):
    """A repository made anew at the same address is another: a marker of the old one said a file was
    archived, PostgreSQL recycled it, and the new archive never had it."""
    wal, names = pg_wal_with_ready(tmp_path, 3)
    spool = str(tmp_path / "spool")
    cli("archive-push", "-r", repo_url, "--spool", spool, str(wal / names[0]))
    dest = tmp_path / "RECOVERYXLOG"
    cli("archive-get", "-r", repo_url, "--spool", spool, names[0], str(dest))  # names[1] and [2] fetched ahead
    shutil.rmtree(tmp_path / "repo")
    cli("init", "-r", repo_url, "--kdf-time", "0")
    out = cli("archive-push", "-r", repo_url, "--spool", spool, "--batch", "1", str(wal / names[1])).stdout.decode()
    assert f"archived {names[1]}" in out  # pushed for real: the marker was the old repository's
    cli("archive-get", "-r", repo_url, "--spool", spool, names[1], str(dest))
    missing = cli("archive-get", "-r", repo_url, "--spool", spool, names[2], str(tmp_path / "x"), check=1)
    assert "is not in the WAL archive" in missing.stderr.decode()


def test_a_spool_that_cannot_be_used_only_costs_the_batch(tmp_path, cli, repo_url):
    """An unwritable spool failed every push with an internal error after archiving, and every get with a
    usage error PostgreSQL took for 'not archived'."""
    wal, names = pg_wal_with_ready(tmp_path, 3)
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the spool's directory would be")
    out = cli("archive-push", "-r", repo_url, "--spool", str(blocked / "spool"), str(wal / names[0]))
    assert f"archived {names[0]}" in out.stdout.decode() and "cannot be used" in out.stderr.decode()
    got = cli("archive-get", "-r", repo_url, "--spool", str(blocked / "spool"), names[0], str(tmp_path / "seg"))
    assert (tmp_path / "seg").read_bytes() == (wal / names[0]).read_bytes()
    assert "cannot be used" in got.stderr.decode()
    archived_as_postgresql_would(wal, names[0])
    spool = tmp_path / "spool"
    (spool / f"{names[2]}.ok.tmp").mkdir(parents=True)  # no marker can be written in its place
    result = json.loads(cli("archive-push", "-r", repo_url, "--spool", str(spool), "--json",
                            str(wal / names[1])).stdout)
    assert result["name"] == names[1] and [r["name"] for r in result["ahead"]] == [names[2]]
    assert result["ahead_error"].startswith(f"{names[2]}: cannot write its marker")
    assert not (spool / f"{names[2]}.ok").exists()


def test_a_copy_from_the_spool_stopped_midway_leaves_nothing_beside_its_destination(tmp_path, monkeypatch):
    """With the spool on another file system the file is copied beside pg_wal's file: a SIGQUIT then left the
    partial copy there for good."""
    from chunkvault import walspool

    fetched = walspool.Prefetched(str(tmp_path / "spool"), "repo id")
    (tmp_path / "pg_wal").mkdir()
    with open(os.path.join(fetched.path, SEG), "wb") as f:
        f.write(b"segment")
    monkeypatch.setattr(walspool.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(18, "cross-device")))

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(walspool.shutil, "copyfileobj", stopped)
    with pytest.raises(KeyboardInterrupt):
        fetched.take(SEG, str(tmp_path / "pg_wal" / "RECOVERYXLOG"))
    assert os.listdir(tmp_path / "pg_wal") == [] and os.listdir(fetched.path) == [SEG]


def _stored_format(repo_dir) -> int:
    return json.loads((repo_dir / "config").read_bytes())["format"]


def test_the_first_push_raises_the_format_so_a_chunkvault_before_the_archive_refuses_the_repository(
        tmp_path, cli, repo_url, monkeypatch):
    """A chunkvault before ``wal/`` objects (format 1) opened the repository, and its prune, seeing no snapshot
    name the archive's data, deleted it; now it stops at the config (exit 17) before anything."""
    from chunkvault.errors import UnsupportedFormat
    from chunkvault.store import config as config_module

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    cli("backup", "-r", repo_url, str(src))
    assert _stored_format(tmp_path / "repo") == 1  # no archive: every chunkvault reads it
    cli("archive-push", "-r", repo_url, str(segment_file(tmp_path, size=1 << 20)))
    assert _stored_format(tmp_path / "repo") == config_module.FORMAT_WAL == 2
    cli("config", "-r", repo_url, "set", "compression", "5")  # a rewrite keeps the format
    assert _stored_format(tmp_path / "repo") == 2
    copied = tmp_path / "copy"
    cli("init", "-r", str(copied), "--kdf-time", "0")
    cli("copy", "-r", repo_url, "--to", str(copied), "--wal", env={"CHUNKVAULT_TO_PASSWORD": PASSWORD})
    assert _stored_format(copied) == 2
    with Repository.open(repo_url, PASSWORD) as repo:
        assert repo._repo.config.format == 2
    monkeypatch.setattr(config_module, "FORMAT_VERSION", 1)  # as the reader before the archive
    with pytest.raises(UnsupportedFormat, match="format 2 is newer"):
        config_module.peek_config((tmp_path / "repo" / "config").read_bytes())


def test_a_config_put_back_from_an_export_made_before_the_archive_keeps_the_raised_format(tmp_path, cli, repo_url):
    """The export holds the config at format 1: put back as it was, a chunkvault before the archive opened the
    repository again, and its prune deleted the archive's data."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    cli("backup", "-r", repo_url, str(src))
    with Repository.open(repo_url, PASSWORD) as repo:
        kit = repo.export_key()
    cli("archive-push", "-r", repo_url, str(segment_file(tmp_path, size=1 << 20)))
    (tmp_path / "repo" / "config").unlink()
    assert Repository.import_key(repo_url, kit, PASSWORD).restored == ["config"]
    assert _stored_format(tmp_path / "repo") == 2
    with Repository.open(repo_url, PASSWORD) as repo:
        assert repo.check(read_data=True).ok and repo._repo.config.format == 2
