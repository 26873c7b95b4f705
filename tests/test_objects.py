"""`list` and `cat`: a repository's raw objects by kind, decoded by the readers every command uses; and
CHUNKVAULT_HOST, the host backups record and `latest` is chosen among."""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import random

import pytest

from chunkvault import Repository
from chunkvault.errors import AmbiguousId, CorruptObject, NoSuchObject, UsageError
from chunkvault.store.blob import open_envelope
from chunkvault.store.objects import BlobInfo, unique_name
from chunkvault.store.repository import pack_key
from servers_http import APPEND_TOKEN, FULL_TOKEN, READ_TOKEN, http_server, serve_factory  # noqa: F401

PW = "correct horse battery staple"
PAGE = 8192
ALL_BYTES = bytes(range(256)) * 4 + b"\r\n\x00\x1b[2J\xff\xfe"  # every byte value, line ends, NUL, an escape


def _pages(path, rnd, pages=64):
    """A file of 8 KiB pages, half random and half repeated rows, like a database table."""
    with open(path, "wb") as f:
        for i in range(pages):
            f.write(rnd.randbytes(PAGE // 2) + ((b"row %06d|" % i) * PAGE)[: PAGE // 2])


def _touch(path, rnd):
    with open(path, "r+b") as f:
        for p in range(os.path.getsize(path) // PAGE):
            f.seek(p * PAGE + 100)
            f.write(rnd.randbytes(8))


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A repository with a full snapshot and a differential whose changed chunks are deltas: its path, the
    source, the two snapshots, and the differential's delta blob ids."""
    base = tmp_path_factory.mktemp("objects")
    rnd = random.Random(7)
    src = base / "src"
    src.mkdir()
    _pages(src / "table", rnd)
    (src / "bytes").write_bytes(ALL_BYTES)
    (src / "gone").write_bytes(b"removed in the differential")
    path = str(base / "repo")
    with Repository.init(path, PW, kdf_seconds=0, pack_size=64 << 10, ledger=False) as repo:
        full = repo.backup([str(src)], fixed_chunks=["table"], fixed_chunk_size=64 << 10).snapshot
        _touch(src / "table", rnd)
        (src / "gone").unlink()
        diff = repo.backup([str(src)], fixed_chunks=["table"], fixed_chunk_size=64 << 10).snapshot
        deltas = [c for c in repo.find_entry(diff, "table").chunk_ids() if repo.store.delta_base(c)]
        assert diff.kind == "diff" and deltas
    return path, src, full, diff, deltas


@pytest.fixture
def repo(history):
    with Repository.open(history[0], PW, ledger=False) as r:
        yield r


def _cat(cli, path, *args, **kw):
    return cli("cat", "-r", path, *args, **kw)


def _json(proc):
    return json.loads(proc.stdout)


# --- list ----------------------------------------------------------------------------------------------


def test_list_names_each_kind_as_the_storage_holds_them(history, repo, cli):
    path, _, full, diff, _ = history
    stored = {d: sorted(os.listdir(os.path.join(path, d))) for d in ("snapshots", "index", "keys")}
    packs = sorted(n for d in os.listdir(os.path.join(path, "data")) for n in os.listdir(os.path.join(path, "data", d)))
    expected = {"snapshots": stored["snapshots"], "index": stored["index"], "packs": packs, "keys": stored["keys"],
                "locks": []}
    assert sorted([full.id, diff.id]) == expected["snapshots"]
    for kind, names in expected.items():
        assert list(repo.list_objects(kind)) == names
        # names are public: no password is asked for (none is given), and none is needed
        assert cli("list", "-r", path, kind, password=None).stdout.decode().split() == names
        assert _json(cli("list", "-r", path, kind, "--json", password=None)) == names
    assert not os.listdir(os.path.join(path, "locks"))


def test_list_blobs_gives_each_blob_of_the_index_with_its_pack_and_a_deltas_base(history, repo, cli):
    path, _, _, _, deltas = history
    blobs = list(repo.list_objects("blobs"))
    assert len(blobs) == len(repo.store.index) and all(isinstance(b, BlobInfo) for b in blobs)
    by_id = {b.id: b for b in blobs}
    for d in deltas:
        b = by_id[d.hex()]
        assert b.kind == "delta" and b.base == repo.store.delta_base(d).hex() and b.base in by_id
        loc = repo.store.locate(d)
        assert (b.offset, b.length, b.raw_length) == (loc.offset, loc.length, loc.raw_length)
    assert {b.kind for b in blobs} >= {"delta", "zstd"}
    assert {b.pack for b in blobs} == set(repo.list_objects("packs"))
    assert all(b.base is None for b in blobs if b.kind != "delta")
    as_json = _json(cli("list", "-r", path, "blobs", "--json"))
    assert as_json == [b.to_dict() for b in blobs]
    lines = cli("list", "-r", path, "blobs").stdout.decode().splitlines()
    first = lines[[b.id for b in blobs].index(deltas[0].hex())].split()
    assert first[:2] == ["delta", deltas[0].hex()] and first[-1] == by_id[deltas[0].hex()].base
    assert cli("list", "-r", path, "blobs", password=None, check=2).stderr.startswith(b"chunkvault: no repository password")
    assert not os.listdir(os.path.join(path, "locks"))


def test_an_unknown_type_is_a_usage_error_naming_the_known_ones(history, repo, cli):
    path = history[0]
    said = cli("list", "-r", path, "trees", check=2).stderr.decode()
    assert "unknown type 'trees'" in said and "snapshots, index, packs, keys, locks, blobs" in said
    said = cli("cat", "-r", path, "tree", "ab", check=2).stderr.decode()
    assert "config, snapshot, index, key, lock, pack, blob, manifest" in said
    said = cli("cat", "-r", path, "masterkey", check=2).stderr.decode()
    assert "never printed" in said and "key export" in said
    with pytest.raises(UsageError, match="unknown type"):
        repo.list_objects("trees")
    with pytest.raises(UsageError, match="never printed"):
        repo.cat("masterkey")
    cli("cat", "-r", path, "config", "abc", check=2)
    cli("cat", "-r", path, "pack", check=2)
    cli("cat", "-r", path, "config", "--raw", check=2)


# --- cat -------------------------------------------------------------------------------------------------


def test_cat_config_shows_its_settings_and_no_secret(history, repo, cli):
    path = history[0]
    doc = _json(_cat(cli, path, "config"))
    assert doc == repo.cat("config")
    assert doc["id"] == repo.store.config.repo_id and doc["format"] == 1
    assert doc["settings"] == dataclasses.asdict(repo.store.config.settings) and doc["settings"]["pack_size"] == 64 << 10
    assert "sealed" not in doc
    _cat(cli, path, "config", password="wrong", check=11)


def test_cat_snapshot_by_prefix_is_the_stored_object(history, repo, cli):
    path, _, full, diff, _ = history
    for snap in (full, diff):
        doc = _json(_cat(cli, path, "snapshot", snap.id[:7].upper()))
        assert doc == dataclasses.asdict(repo.snapshot(snap.id)) == repo.cat("snapshot", snap.id[:5])
    assert _json(_cat(cli, path, "snapshot", diff.id[:6]))["parent"] == full.id
    assert _json(_cat(cli, path, "snapshot", "latest"))["id"] == diff.id
    _cat(cli, path, "snapshot", "0" * 64, check=12)


def test_cat_index_and_pack_decode_what_the_index_and_headers_list(history, repo, cli):
    path = history[0]
    names = list(repo.list_objects("index"))
    for name in names:
        doc = _json(_cat(cli, path, "index", name[:10]))
        stored = repo.store.read_index_object(name)
        assert doc["id"] == name and doc["supersedes"] == []
        assert [p["id"] for p in doc["packs"]] == [p.hex() for p in stored.packs]
        for p in doc["packs"]:
            assert [b["id"] for b in p["blobs"]] == [e.blob_id.hex() for e in stored.packs[bytes.fromhex(p["id"])]]
    deltas_seen = 0
    for name in repo.list_objects("packs"):
        doc = _json(_cat(cli, path, "pack", name[:12]))
        size = os.path.getsize(os.path.join(path, pack_key(bytes.fromhex(name))))
        header = repo.store.pack_header(pack_key(bytes.fromhex(name)), size)
        assert doc["id"] == name and doc["size"] == size and doc == repo.cat("pack", name)
        assert [(b["id"], b["offset"], b["length"], b["raw_length"]) for b in doc["blobs"]] == [
            (e.blob_id.hex(), e.offset, e.length, e.raw_length) for e in header]
        deltas_seen += sum(1 for b in doc["blobs"] if b["kind"] == "delta" and len(b["base"]) == 64)
    assert deltas_seen >= len(history[4])
    assert not os.listdir(os.path.join(path, "locks"))


def test_cat_blob_writes_its_exact_bytes_a_delta_rebuilt(history, repo, cli):
    path, src, _, diff, deltas = history
    chunk = repo.find_entry(diff, "bytes").chunk_ids()[0]
    out = _cat(cli, path, "blob", chunk.hex()[:16]).stdout
    assert out == ALL_BYTES == repo.cat("blob", chunk.hex())
    table = (src / "table").read_bytes()
    ids = repo.find_entry(diff, "table").chunk_ids()
    d = deltas[0]
    at = ids.index(d) * (64 << 10)
    assert _cat(cli, path, "blob", d.hex()).stdout == table[at:at + (64 << 10)] == repo.cat("blob", d.hex()[:20])
    stored = repo.cat("blob", d.hex(), raw=True)
    kind, payload = open_envelope(repo.store.sealer, d, repo.store.read_envelope(d)[0])
    assert kind == 2 and stored == bytes(payload) and stored[0] in (0, 1)
    assert _cat(cli, path, "blob", d.hex(), "--raw").stdout == stored
    assert not os.listdir(os.path.join(path, "locks"))


def test_cat_key_and_lock_need_no_password_and_show_no_secret(history, repo, cli):
    path = history[0]
    (key,) = repo.list_objects("keys")
    doc = _json(_cat(cli, path, "key", key[:4], password=None))
    assert doc == repo.cat("key", key)
    assert doc["id"] == key and doc["kdf"] == "argon2id" and doc["repository"] == repo.store.config.repo_id
    assert not {"salt", "data"} & set(doc)
    with repo.reading("restore"):  # a lock another command holds
        (lock,) = repo.list_objects("locks")
        assert cli("list", "-r", path, "locks", password=None).stdout.decode().split() == [lock]
        doc = _json(_cat(cli, path, "lock", lock[:6], password=None))
        assert doc["id"] == lock and doc["kind"] == "shared" and doc["purpose"] == "restore"
        assert doc["pid"] == os.getpid()
    assert not os.listdir(os.path.join(path, "locks"))


def test_cat_manifest_gives_a_differentials_own_records(history, repo, cli):
    path, _, full, diff, deltas = history
    records = _json(_cat(cli, path, "manifest", diff.id[:8]))
    by_path = {r["path"]: r for r in records}
    assert by_path["gone"]["op"] == "delete" and "type" not in by_path["gone"]
    table = by_path["table"]
    assert table["op"] in ("entry", "fresh") and deltas[0].hex() in table["chunk_ids"]
    assert table["chunks"] == len(table["chunk_ids"])
    assert "bytes" not in by_path  # unchanged: in the full's manifest only
    whole = {r["path"] for r in _json(_cat(cli, path, "manifest", full.id[:8]))}
    assert {"", "table", "bytes", "gone"} <= whole
    with repo.reading():
        assert [r.path for r in repo.manifest(diff.id)] == [os.fsencode(r["path"]) for r in records]


def test_ids_matching_none_or_several_are_refused_with_the_snapshot_codes(history, repo, cli):
    path = history[0]
    blobs = [b.id for b in repo.list_objects("blobs")]
    shared = next(c for c in "0123456789abcdef" if sum(b.startswith(c) for b in blobs) > 1)
    said = _cat(cli, path, "blob", shared, check=12).stderr.decode()
    assert "ambiguous" in said
    with pytest.raises(AmbiguousId):
        repo.cat("blob", shared)
    said = _cat(cli, path, "index", "zz", check=12).stderr.decode()
    assert "no index 'zz'" in said and "list index" in said
    _cat(cli, path, "pack", "zz", check=12)
    _cat(cli, path, "key", "zz", check=12, password=None)
    _cat(cli, path, "lock", "zz", check=12, password=None)
    _cat(cli, path, "blob", "0" * 63 + "g", check=12)
    _cat(cli, path, "blob", "", check=2)
    with pytest.raises(NoSuchObject):
        repo.cat("pack", "zz")
    assert not os.listdir(os.path.join(path, "locks"))


def test_completion_offers_the_types():
    from chunkvault.cli import build_parser
    from chunkvault.completion import commands
    from chunkvault.store.objects import CAT_KINDS, LIST_KINDS

    tables = commands(build_parser()).subcommands
    assert tables["list"].positional == LIST_KINDS
    assert tables["cat"].positional == (*CAT_KINDS, "manifest")


def test_unique_name_is_pure():
    names = ["ab12", "ab34", "cd"]
    assert unique_name(names, "CD", "pack") == "cd" and unique_name(names, "ab3", "pack") == "ab34"
    assert unique_name(["ab", "abc"], "ab", "key") == "ab"
    with pytest.raises(AmbiguousId):
        unique_name(names, "ab", "pack")
    with pytest.raises(NoSuchObject, match="no pack 'ef'"):
        unique_name(names, "ef", "pack")
    with pytest.raises(UsageError):
        unique_name(names, " ", "pack")


def test_a_damaged_object_is_named_with_the_damage_exit_code(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    path = str(tmp_path / "repo")
    with Repository.init(path, PW, kdf_seconds=0, ledger=False) as repo:
        repo.backup([str(src)])
        (index,) = repo.list_objects("index")
        (pack,) = repo.list_objects("packs")
        (snap,) = repo.list_objects("snapshots")
    (tmp_path / "repo" / "locks" / ("9" * 32)).write_bytes(b"not a lock")
    said = _cat(cli, path, "lock", "999", check=13, password=None).stderr.decode()
    assert f"locks/{'9' * 32}" in said
    for what, name in (("index", index), ("pack", pack), ("snapshot", snap)):
        key = pack_key(bytes.fromhex(name)) if what == "pack" else f"{'snapshots' if what == 'snapshot' else what}/{name}"
        file = tmp_path / "repo" / key
        data = bytearray(file.read_bytes())
        data[-30] ^= 1
        file.write_bytes(bytes(data))
        said = _cat(cli, path, what, name[:8], check=13).stderr.decode()
        assert name in said and "corrupt" in said, said
    with Repository.open(path, PW, ledger=False) as repo, pytest.raises(CorruptObject, match=pack):
        repo.cat("pack", pack)


def test_list_and_cat_read_through_append_only_and_read_only_tokens(tmp_path, http_server, cli):  # noqa: F811
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(ALL_BYTES)
    url = http_server.url
    env = {token: {"CHUNKVAULT_HTTP_TOKEN": token, "CHUNKVAULT_CACHE_DIR": str(tmp_path / f"cache{i}")}
           for i, token in enumerate((FULL_TOKEN, APPEND_TOKEN, READ_TOKEN))}
    cli("init", "-r", url, "--kdf-time", "0", env=env[FULL_TOKEN])
    cli("backup", "-r", url, str(src), env=env[FULL_TOKEN])
    for token in (APPEND_TOKEN, READ_TOKEN):
        (snap,) = cli("list", "-r", url, "snapshots", password=None, env=env[token]).stdout.decode().split()
        blobs = cli("list", "-r", url, "blobs", "--no-lock", env=env[token]).stdout.decode().splitlines()
        assert len(blobs) == 2  # the file's chunk and the manifest's
        doc = _json(cli("cat", "-r", url, "snapshot", snap[:8], env=env[token]))
        assert doc["id"] == snap
        assert any(cli("cat", "-r", url, "blob", line.split()[1], env=env[token]).stdout == ALL_BYTES
                   for line in blobs)
    assert not list((http_server.path / "locks").glob("*"))


# --- CHUNKVAULT_HOST ---------------------------------------------------------------------------------------


def test_chunkvault_host_is_the_backups_host_and_latests_filter(tmp_path, cli):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"one")
    path = str(tmp_path / "repo")
    cli("init", "-r", path, "--kdf-time", "0")
    cli("backup", "-r", path, str(src), env={"CHUNKVAULT_HOST": "container-a"})
    (src / "f").write_bytes(b"two")
    cli("backup", "-r", path, str(src), "--host", "other", env={"CHUNKVAULT_HOST": "container-a"})
    snaps = _json(cli("snapshots", "-r", path, "--json"))
    assert [s["host"] for s in snaps] == ["container-a", "other"]
    a = _json(cli("snapshots", "-r", path, "--json", env={"CHUNKVAULT_HOST": "container-a"}))
    assert [s["host"] for s in a] == ["container-a"]
    both = _json(cli("snapshots", "-r", path, "--json", env={"CHUNKVAULT_HOST": ""}))
    assert len(both) == 2
    explicit = _json(cli("snapshots", "-r", path, "--json", "--host", "other", env={"CHUNKVAULT_HOST": "container-a"}))
    assert [s["host"] for s in explicit] == ["other"]
    # latest is this host's; an id names its snapshot whatever the host
    env = {"CHUNKVAULT_HOST": "container-a"}
    assert cli("dump", "-r", path, "latest", "f", env=env).stdout == b"one"
    assert cli("dump", "-r", path, "latest", "f").stdout == b"two"
    assert cli("dump", "-r", path, snaps[1]["id"][:8], "f", env=env).stdout == b"two"
    assert cli("dump", "-r", path, "latest", "f", "--host", "other", env=env).stdout == b"two"
    said = cli("dump", "-r", path, "latest", "f", env={"CHUNKVAULT_HOST": "nobody"}, check=12).stderr.decode()
    assert "host nobody" in said
    found = _json(cli("find", "-r", path, "f", "--json", env=env))
    assert [v["snapshots"] for v in found[0]["versions"]] == [[snaps[0]["id"]]]
    verified = _json(cli("verify-restore", "-r", path, "--all-since", "1d", "--json", env=env))
    assert [r["snapshot_id"] for r in verified["snapshots"]] == [snaps[0]["id"]]


def test_cat_blob_whose_reader_goes_away_is_no_success(tmp_path, cli):
    """`cat blob ID | head -c 10` exited 0: the blob went out in one write, and the part a closing pipe took
    passed for the whole.  It ends as `cat` does there (141), saying so."""
    import subprocess
    import sys

    from conftest import PASSWORD

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    path = str(tmp_path / "repo")
    cli("init", "-r", path, "--kdf-time", "0")
    cli("backup", "-r", path, str(src))
    blob = max((line.split() for line in cli("list", "-r", path, "blobs").stdout.decode().splitlines()),
               key=lambda f: int(f[5]))[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = PASSWORD
    for extra in ([], ["--raw"]):
        proc = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "cat", "-r", path, "blob", blob, *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert len(proc.stdout.read(10)) == 10
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(120) == 141, err
        assert "before it had the whole blob" in err


def test_cat_snapshot_gives_the_bytes_of_a_path_that_is_not_utf8(tmp_path, cli):
    """snapshots --json added paths_b64 for such a path; cat snapshot gave the lone surrogates alone, which
    a parser in another language reads as U+FFFD."""
    path = str(tmp_path / "repo")
    src = tmp_path / os.fsdecode(b"caf\xe9")
    src.mkdir()
    (src / "f").write_bytes(b"x")
    cli("init", "-r", path)
    cli("backup", "-r", path, str(src))
    doc = _json(_cat(cli, path, "snapshot", "latest"))
    listed = _json(cli("snapshots", "-r", path, "--json"))[0]
    assert doc["paths_b64"] == listed["paths_b64"] == [base64.b64encode(os.fsencode(str(src))).decode()]


def test_snapshots_json_gives_the_bytes_of_an_unreadable_path_that_is_not_utf8(tmp_path, cli, monkeypatch,
                                                                               python_file_reads):
    """stats.unreadable names the paths a backup could not read: one that is not UTF-8 came as lone
    surrogates alone, where every other list of paths adds its bytes."""
    from treeutil import refusing_open

    src = tmp_path / "src"
    src.mkdir()
    name = os.fsdecode(b"caf\xe9")
    (src / name).write_bytes(b"never read")
    path = str(tmp_path / "repo")
    with Repository.init(path, PW, kdf_seconds=0, ledger=False) as repo:
        monkeypatch.setattr("chunkvault.store.backup.os.open", refusing_open(name))
        repo.backup([str(src)])
        monkeypatch.undo()
    (listed,) = _json(cli("snapshots", "-r", path, "--json"))
    assert listed["stats"]["unreadable"] == [name]
    assert listed["stats"]["unreadable_b64"] == [base64.b64encode(b"caf\xe9").decode()]
    assert _json(_cat(cli, path, "snapshot", "latest"))["stats"]["unreadable_b64"] == listed["stats"]["unreadable_b64"]
