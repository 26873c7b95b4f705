"""`chunkvault config`: a repository's settings read and changed after init, from the next command on."""
from __future__ import annotations

import json
import os
import random
import threading

import pytest
from hypothesis import given, strategies as st

from chunkvault import Repository
from chunkvault.errors import PermissionDenied, RemoteError, UsageError
from chunkvault.store.blob import compress
from chunkvault.store.config import CHANGEABLE_SETTINGS, FIXED_SETTINGS, Settings, changed_settings
from chunkvault.store.locks import SHARED, RepoLock
from chunkvault.units import parse_share
from servers_http import APPEND_TOKEN, FULL_TOKEN, serve_factory, write_tokens  # noqa: F401
from servers_ssh import SSHServer, require_sshd
from treeutil import describe
from walsegments import segment_bytes

PASSWORD = "correct horse battery staple"


def text_like(seed: int, size: int) -> bytes:
    """Compressible bytes unlike any other seed's: words drawn at random."""
    rnd = random.Random(seed)
    words = [bytes(rnd.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randrange(2, 9))) for _ in range(400)]
    out = bytearray()
    while len(out) < size:
        out += rnd.choice(words) + b" "
    return bytes(out[:size])


def test_settings_set_on_the_command_line_are_read_back_by_a_new_process_and_check_accepts_them(tmp_path, cli):
    r = str(tmp_path / "repo")
    cli("init", "-r", r, "--kdf-time", "0")
    before = json.loads(cli("config", "-r", r, "--json").stdout)
    assert before["settings"]["compression_level"] == 3 and before["settings"]["pack_size"] == 16 << 20
    out = json.loads(cli("config", "-r", r, "set", "compression", "19", "pack-size", "4M", "full-every", "6",
                         "max-diff-share", "20%", "--json").stdout)
    assert out["changed"] == {"compression_level": {"old": 3, "new": 19}, "pack_size": {"old": 16 << 20, "new": 4 << 20},
                              "full_every": {"old": 23, "new": 6}, "max_diff_share": {"old": 0.5, "new": 0.2}}
    after = json.loads(cli("config", "-r", r, "--json").stdout)
    assert after == {**before, "settings": {**before["settings"], "compression_level": 19, "pack_size": 4 << 20,
                                            "full_every": 6, "max_diff_share": 0.2}}
    assert json.loads(cli("cat", "config", "-r", r).stdout) == after
    text = cli("config", "-r", r).stdout.decode()
    assert "compression     19" in text and "pack-size       4.0 MiB" in text and "(fixed)" in text
    assert "nothing changed" in cli("config", "-r", r, "set", "compression", "19").stdout.decode()
    cli("check", "-r", r)


def test_a_backup_after_compression_19_writes_its_blobs_at_19_and_old_data_still_restores(tmp_path, new_repo):
    """Also in a Repository opened before the change (a service's): its next backup takes the new level."""
    r = str(tmp_path / "repo")
    kept_open = new_repo(r)
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(text_like(1, 300_000))
    first = kept_open.backup([str(src)]).snapshot
    with Repository.open(r, PASSWORD) as other:
        assert other.set_settings(compression_level=19) == {"compression_level": (3, 19)}
    (src / "new").write_bytes(text_like(2, 300_000))
    second = kept_open.backup([str(src)]).snapshot
    levels = {}
    for name in ("old", "new"):
        ids = kept_open.find_entry(second, name).chunk_ids()
        for blob_id in ids:
            plain = kept_open.cat("blob", blob_id.hex(), raw=False)
            payload = kept_open.cat("blob", blob_id.hex(), raw=True)
            by_level = {lv: bytes(compress(plain, lv)[1]) for lv in (3, 19)}
            if by_level[3] == by_level[19]:  # a chunk the levels compress alike (a file's short tail, cut where
                continue                     # the repository's keyed chunker cuts it) tells them not apart
            levels.setdefault(name, set()).update(lv for lv, p in by_level.items() if p == payload)
    assert levels == {"old": {3}, "new": {19}}
    for snap, names in ((first, ["old"]), (second, ["new", "old"])):
        out = tmp_path / f"out-{snap.id}"
        kept_open.restore(snap.id, str(out))
        assert sorted(os.listdir(out)) == names and all((out / n).read_bytes() == (src / n).read_bytes() for n in names)
    assert kept_open.check(read_data=True).ok


def test_a_larger_pack_size_is_honoured_by_the_next_backup(tmp_path, new_repo, cli):
    r = str(tmp_path / "repo")
    repo = new_repo(r, pack_size=100_000, compression_level=0,
                    chunker={"min_size": 4096, "avg_size": 16384, "max_size": 65536})
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(1).randbytes(1_500_000))
    repo.backup([str(src)])
    packs = {p: p.stat().st_size for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file()}
    assert max(packs.values()) < 170_000
    cli("config", "-r", r, "set", "pack-size", "1M")
    (src / "b").write_bytes(random.Random(2).randbytes(1_500_000))
    repo.backup([str(src)])
    new = [p.stat().st_size for p in (tmp_path / "repo" / "data").rglob("*") if p.is_file() and p not in packs]
    assert max(new) > 900_000


def test_full_every_changes_the_next_auto_decision(tmp_path, new_repo, cli):
    r = str(tmp_path / "repo")
    repo = new_repo(r)  # kept open: it takes the change at its next backup
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(3).randbytes(300_000))  # the differentials stay far below its share
    for i, kind in enumerate(("full", "diff", "diff")):
        (src / "f").write_bytes(b"version %d" % i)
        assert repo.backup([str(src)]).snapshot.kind == kind
    cli("config", "-r", r, "set", "full-every", "2")
    (src / "f").write_bytes(b"after")
    assert repo.backup([str(src)]).snapshot.kind == "full"  # two differentials in the chain: a full, where 23 made a diff
    (src / "f").write_bytes(b"after again")
    assert repo.backup([str(src)]).snapshot.kind == "diff"


@pytest.mark.parametrize("words, said", [
    (("chunk-avg", "1M"), "chunker parameters are fixed"),
    (("chunker", "1M"), "chunker parameters are fixed"),
    (("id", "00"), "repository id is fixed"),
    (("compression", "23"), "not a zstd level: 23"),
    (("compression", "-1"), "not a zstd level"),
    (("compression", "high"), "not a number"),
    (("pack-size", "1G"), "pack size must be 1 byte to 256 MiB"),
    (("pack-size", "0"), "size must be at least 1 byte"),
    (("full-every", "-1"), "0 or more"),
    (("max-diff-share", "150%"), "share out of range"),
    (("colour", "blue"), "no setting 'colour'"),
    (("compression",), "NAME VALUE pairs"),
    ((), "NAME VALUE pairs"),
    (("compression", "5", "compression", "6"), "compression is given twice"),
    (("compression", "19", "pack-size", "1G"), "pack size must be"),  # one bad value: none of them changes
])
def test_a_fixed_unknown_or_invalid_setting_is_refused_with_exit_2_and_the_config_unchanged(tmp_path, cli, words, said):
    r = tmp_path / "repo"
    cli("init", "-r", str(r), "--kdf-time", "0")
    before = (r / "config").read_bytes()
    err = cli("config", "-r", str(r), "set", *words, check=2).stderr.decode()
    assert said in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (r / "config").read_bytes() == before


def test_the_api_refuses_what_the_command_line_refuses(tmp_path, new_repo):
    repo = new_repo(str(tmp_path / "repo"))
    before = (tmp_path / "repo" / "config").read_bytes()
    for changes, said in (({"chunker": {"min_size": 1}}, "chunker parameters are fixed"),
                          ({"compression_level": 30}, "compression level must be 0"),
                          ({"pack_size": "huge"}, "not a size"), ({"max_diff_share": 2}, "max_diff_share must be"),
                          ({"full_every": True}, "full_every must be"), ({"colour": 1}, "no setting 'colour'")):
        with pytest.raises(UsageError, match=said):
            repo.set_settings(**changes)
    with pytest.raises(UsageError, match="wait takes seconds"):
        repo.set_settings(compression_level=5, wait=-1)
    assert (tmp_path / "repo" / "config").read_bytes() == before
    assert repo.settings()["settings"]["compression_level"] == 3


def test_a_change_waits_for_a_running_backup_as_forget_does(tmp_path, new_repo, cli):
    repo = new_repo(str(tmp_path / "repo"))
    r = str(tmp_path / "repo")
    before = (tmp_path / "repo" / "config").read_bytes()
    lock = RepoLock(repo.store.remote, SHARED, "backup")
    with lock:
        err = cli("config", "-r", r, "set", "compression", "9", "--wait", "0", check=15).stderr.decode()
        assert "locked by backup" in err and err.rstrip().endswith("; the settings are unchanged")
        assert (tmp_path / "repo" / "config").read_bytes() == before
        threading.Timer(1.0, lock.release).start()
        cli("config", "-r", r, "set", "compression", "9", "--wait", "30")
    assert Repository.open(r, PASSWORD).settings()["settings"]["compression_level"] == 9


def test_a_change_another_command_made_since_opening_is_kept(tmp_path, new_repo):
    """The config is read again under the lock: a Repository opened before another change sets its own
    setting over the stored config, not over what it opened."""
    a = new_repo(str(tmp_path / "repo"))
    with Repository.open(str(tmp_path / "repo"), PASSWORD) as b:
        b.set_settings(full_every=4)
    a.set_settings(compression_level=7)
    settings = a.settings()["settings"]
    assert (settings["full_every"], settings["compression_level"]) == (4, 7)


def test_a_failed_write_leaves_the_old_config(tmp_path, new_repo, monkeypatch):
    repo = new_repo(str(tmp_path / "repo"))
    before = (tmp_path / "repo" / "config").read_bytes()

    real = os.replace

    def refuse(src, dst, *args, **kwargs):  # the config's write only: the lock's, before it, goes through
        if os.path.basename(dst) == "config":
            raise OSError(5, "Input/output error")
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", refuse)
        with pytest.raises(RemoteError, match="writing config: Input/output error"):
            repo.set_settings(compression_level=12)
    assert (tmp_path / "repo" / "config").read_bytes() == before
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name.startswith(".tmp-")]
    with Repository.open(str(tmp_path / "repo"), PASSWORD) as again:
        assert again.settings()["settings"]["compression_level"] == 3


def test_over_http_a_full_token_changes_settings_and_an_append_only_one_is_refused(tmp_path, serve_factory, cli):
    server = serve_factory("--tokens", str(write_tokens(tmp_path)))
    url = server.url

    def env(token: str) -> dict[str, str]:
        return {"CHUNKVAULT_HTTP_TOKEN": token, "CHUNKVAULT_CACHE_DIR": str(tmp_path / f"cache-{token[:6]}")}

    cli("init", "-r", url, "--kdf-time", "0", env=env(FULL_TOKEN))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(text_like(3, 200_000))
    cli("backup", "-r", url, str(src), env=env(FULL_TOKEN))
    cli("config", "-r", url, "set", "compression", "19", "full-every", "2", env=env(FULL_TOKEN))
    before = (server.path / "config").read_bytes()
    err = cli("config", "-r", url, "set", "compression", "1", env=env(APPEND_TOKEN), check=14).stderr.decode()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "append-only" in lines[0] and lines[0].endswith("the settings are unchanged")
    assert (server.path / "config").read_bytes() == before
    shown = json.loads(cli("config", "-r", url, "--json", env=env(APPEND_TOKEN)).stdout)["settings"]
    assert (shown["compression_level"], shown["full_every"]) == (19, 2)  # reading them is no change
    with Repository.open(url, PASSWORD, token=APPEND_TOKEN, cache=False) as repo:
        with pytest.raises(PermissionDenied, match="append-only"):
            repo.set_settings(full_every=0)
    cli("check", "-r", url, env=env(FULL_TOKEN))
    cli("restore", "-r", url, "latest", "--target", str(tmp_path / "out"), env=env(FULL_TOKEN))
    assert describe(tmp_path / "out") == describe(src)


def test_key_import_of_an_export_made_before_a_change_keeps_the_new_settings_and_names_them(tmp_path, new_repo, cli):
    r = tmp_path / "repo"
    repo = new_repo(str(r))
    export = repo.export_key()
    repo.set_settings(compression_level=19, pack_size="4M")
    changed = (r / "config").read_bytes()
    result = Repository.import_key(str(r), export, PASSWORD)
    assert result.restored == [] and (r / "config").read_bytes() == changed
    assert "compression_level 3 then, 19 now" in result.note and "pack_size 16777216 then, 4194304 now" in result.note
    assert b"config" in repo.export_key() and json.loads(json.loads(repo.export_key())["config"]) == json.loads(changed)
    (tmp_path / "old.json").write_bytes(export)
    out = cli("key", "import", "-r", str(r), str(tmp_path / "old.json"), "--json")
    assert "compression_level 3 then, 19 now" in json.loads(out.stdout)["note"]
    assert b"compression_level 3 then" in out.stderr  # warned too
    (r / "config").write_bytes(b"\x00damaged")  # only the export's config is left to put back: it says so
    result = Repository.import_key(str(r), export, PASSWORD)
    assert result.restored == ["config"] and "settings of the export's time" in result.note
    with Repository.open(str(r), PASSWORD) as again:
        assert again.settings()["settings"]["compression_level"] == 3


SETTINGS = Settings(chunker={"min_size": 1 << 16, "avg_size": 1 << 18, "max_size": 1 << 21})
VALID = {"compression_level": st.integers(0, 22), "pack_size": st.integers(1, 256 << 20),
         "full_every": st.integers(0, 1000), "max_diff_share": st.floats(0, 1)}


@given(st.fixed_dictionaries({}, optional=VALID))
def test_changed_settings_applies_exactly_the_changes_and_leaves_its_input_alone(changes):
    original = Settings(**{**SETTINGS.__dict__, "chunker": dict(SETTINGS.chunker), "extra": {"later": 1}})
    new = changed_settings(original, changes)
    for name in CHANGEABLE_SETTINGS:
        assert getattr(new, name) == changes.get(name, getattr(original, name))
    assert new.chunker == SETTINGS.chunker and new.extra == {"later": 1} and new.chunker is not original.chunker
    assert original == Settings(**{**SETTINGS.__dict__, "extra": {"later": 1}})


@given(st.sampled_from(sorted(FIXED_SETTINGS)), st.integers())
def test_changed_settings_refuses_the_fixed_ones(name, value):
    with pytest.raises(UsageError, match="fixed when a repository is created"):
        changed_settings(SETTINGS, {name: value})


def test_a_wal_push_of_a_repository_kept_open_takes_the_new_compression(tmp_path, new_repo):
    repo = new_repo(str(tmp_path / "repo"))
    wal = tmp_path / "000000010000000000000001"
    segment = bytearray(segment_bytes(wal.name, 1 << 20, filled=0))
    segment[4096:204_096] = text_like(4, 200_000)
    wal.write_bytes(segment)
    with Repository.open(str(tmp_path / "repo"), PASSWORD) as other:
        other.set_settings(compression_level=0)
    repo.archive_push(str(wal))
    kinds = {b.kind for b in repo.list_objects("blobs")}
    assert kinds == {"raw"}  # stored as it is: compressible text at 3 would be zstd
    out = tmp_path / "seg"
    repo.archive_get(wal.name, str(out))
    assert out.read_bytes() == wal.read_bytes()


def test_over_sftp_settings_change_and_the_next_backup_takes_them(tmp_path, cli):
    require_sshd()
    (tmp_path / "sshd").mkdir()
    server = SSHServer(str(tmp_path / "sshd"))
    server.start()
    try:
        url = server.url(str(tmp_path / "sftp-repo"))
        env = {**server.env, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache")}
        cli("init", "-r", url, "--kdf-time", "0", "-o", "sftp.accept-new-host-key=yes", env=env)
        cli("config", "-r", url, "set", "compression", "0", "pack-size", "300K", env=env)
        assert json.loads(cli("config", "-r", url, "--json", env=env).stdout)["settings"]["pack_size"] == 300 << 10
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(text_like(5, 200_000))
        cli("backup", "-r", url, str(src), env=env)
        blobs = json.loads(cli("list", "blobs", "-r", url, "--json", env=env).stdout)
        assert {b["kind"] for b in blobs} == {"raw"}
        cli("check", "-r", url, "--read-data", env=env)
    finally:
        server.stop()


def test_a_negative_zero_share_is_stored_and_shown_as_zero(tmp_path, cli):
    """``-0`` parses to -0.0, which is no other share than 0: it was stored and shown as -0.0."""
    import math
    r = str(tmp_path / "repo")
    cli("init", "-r", r, "--kdf-time", "0")
    cli("config", "-r", r, "set", "max-diff-share", "-0")
    share = json.loads(cli("config", "-r", r, "--json").stdout)["settings"]["max_diff_share"]
    assert share == 0 and math.copysign(1, share) == 1
    assert "max-diff-share  0.0\n" in cli("config", "-r", r).stdout.decode()
    assert math.copysign(1, parse_share("-0%")) == 1
