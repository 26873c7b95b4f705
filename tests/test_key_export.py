"""Key exports: a repository whose key files or config are lost or damaged opens again from one kept elsewhere."""
import json
import os
import shutil
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault import Repository, new_secret
from chunkvault.errors import (ChunkvaultError, CorruptObject, RepositoryNotFound, UnsupportedFormat, UsageError,
                               WrongPassword)
from chunkvault.store.config import FORMAT_VERSION
from chunkvault.store.keyexport import EXPORT_MAGIC, KeyExport
from servers_http import APPEND_TOKEN, FULL_TOKEN, http_server, serve_factory  # noqa: F401
from treeutil import describe

PASSWORD = b"pw"


@pytest.fixture
def backed_up(tmp_path):
    """A repository with one backup, its export, and the tree it holds."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    (src / "b").write_text("b\n")
    repo = Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0)
    repo.backup([str(src)])
    kit = repo.export_key()
    repo.close()
    return tmp_path / "repo", kit, src


def objects(path) -> dict[str, bytes]:
    """The repository's objects (not the space a local repository keeps back for locks)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".reserve"}


def restores_exactly(path, src, tmp_path, password=PASSWORD) -> bool:
    with Repository.open(str(path), password) as repo:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        repo.restore("latest", str(out))
        return describe(out) == describe(src) and repo.check(read_data=True).ok


@pytest.mark.parametrize("damage", ["key garbage", "key deleted", "config deleted", "config garbage",
                                    "config tampered", "config id damaged", "both deleted"])
def test_an_import_puts_back_what_was_lost_or_damaged_and_the_repository_opens_again(backed_up, tmp_path, damage):
    path, kit, src = backed_up
    (key,) = (path / "keys").iterdir()
    if "key" in damage or "both" in damage:
        key.unlink() if "deleted" in damage else key.write_bytes(b"garbage")
    if "config" in damage or "both" in damage:
        config = path / "config"
        if "deleted" in damage:
            config.unlink()
        elif "tampered" in damage:
            doc = json.loads(config.read_bytes())
            doc["sealed"] = doc["sealed"][:-8] + ("A" * 8 if not doc["sealed"].endswith("A" * 8) else "B" * 8)
            config.write_text(json.dumps(doc))
        elif "id" in damage:  # the clear id no longer the key files': import refused it as another repository's
            doc = json.loads(config.read_bytes())
            doc["id"] = ("1" if doc["id"][0] != "1" else "2") + doc["id"][1:]
            config.write_text(json.dumps(doc))
        else:
            config.write_bytes(b"\x00garbage")
    with pytest.raises(ChunkvaultError):
        Repository.open(str(path), PASSWORD)
    result = Repository.import_key(str(path), kit, PASSWORD)
    expected = ([] if "config" not in damage and "both" not in damage else ["config"]) + (
        [f"keys/{key.name}"] if "key" in damage or "both" in damage else [])
    assert result.restored == expected and result.key == key.name
    assert restores_exactly(path, src, tmp_path)
    assert Repository.import_key(str(path), kit, PASSWORD).restored == []  # run again: all whole


def test_a_whole_repository_is_left_as_it_is_and_a_config_changed_since_the_export_is_kept(backed_up):
    path, kit, _ = backed_up
    with Repository.open(str(path), PASSWORD) as repo:
        repo.set_settings(compression_level=9)
    before = objects(path)
    assert Repository.import_key(str(path), kit, PASSWORD).restored == []
    assert objects(path) == before
    with Repository.open(str(path), PASSWORD) as repo:
        assert repo.store.config.settings.compression_level == 9


def test_a_wrong_password_another_repository_or_no_repository_imports_nothing(backed_up, tmp_path):
    path, kit, _ = backed_up
    (path / "config").unlink()
    before = objects(path)
    with pytest.raises(WrongPassword, match="does not open with it"):
        Repository.import_key(str(path), kit, b"not it")
    other = Repository.init(str(tmp_path / "other"), PASSWORD, kdf_seconds=0)
    other.close()
    other_before = objects(tmp_path / "other")
    with pytest.raises(UsageError, match="not this repository's key export .its key files name repository"):
        Repository.import_key(str(tmp_path / "other"), kit, PASSWORD)
    assert objects(tmp_path / "other") == other_before
    (tmp_path / "empty").mkdir()
    with pytest.raises(RepositoryNotFound):
        Repository.import_key(str(tmp_path / "empty"), kit, PASSWORD)
    assert not list((tmp_path / "empty").iterdir())
    assert objects(path) == before


def test_another_repository_s_kit_is_refused_where_the_config_and_every_key_are_gone(backed_up, tmp_path):
    """Nothing there names a repository to compare the kit with: the snapshots' objects do, and the kit's key
    opens none of them.  Put back, the other repository's config made this one list no snapshot."""
    path, _, _ = backed_up
    other = Repository.init(str(tmp_path / "other"), PASSWORD, kdf_seconds=0)
    foreign = other.export_key()
    other.close()
    (path / "config").unlink()
    for key in (path / "keys").iterdir():
        key.unlink()
    before = objects(path)
    with pytest.raises(UsageError, match="opens under the exported key"):
        Repository.import_key(str(path), foreign, PASSWORD)
    assert objects(path) == before


def test_a_kit_holding_another_repository_s_key_is_named_damaged_not_a_wrong_password(backed_up, tmp_path, cli):
    """One repository's id and config with another's key file (same password): the kit contradicts itself,
    which is damage (exit 13), not a password that does not open it (exit 11, which sends the user looking
    for another password)."""
    path, kit, _ = backed_up
    other = Repository.init(str(tmp_path / "other"), PASSWORD, kdf_seconds=0)
    mixed = json.dumps({**json.loads(kit), "key": json.loads(other.export_key())["key"]}).encode()
    other.close()
    with pytest.raises(CorruptObject, match="its key belongs to another repository than it names") as err:
        KeyExport.decode(mixed, "the kit")
    assert err.value.object_name == "the kit"
    for key in (path / "keys").iterdir():
        key.unlink()
    before = objects(path)
    with pytest.raises(CorruptObject, match="another repository"):
        Repository.import_key(str(path), mixed, PASSWORD)
    (tmp_path / "mixed.json").write_bytes(mixed)
    r = cli("key", "import", "-r", str(path), str(tmp_path / "mixed.json"), password="pw", check=13)
    assert "its key belongs to another repository than it names" in r.stderr.decode()
    assert objects(path) == before


def test_a_kit_read_as_text_is_taken_and_a_damaged_one_is_corrupt_not_a_type_error(backed_up):
    path, kit, _ = backed_up
    (path / "config").unlink()
    with pytest.raises(CorruptObject, match="damaged key export"):
        Repository.import_key(str(path), kit[: len(kit) // 2].decode(), PASSWORD)
    with pytest.raises(UsageError, match="a key export is bytes"):
        Repository.import_key(str(path), 5, PASSWORD)
    assert Repository.import_key(str(path), kit.decode(), PASSWORD).restored == ["config"]


def test_a_newer_format_config_is_not_replaced_by_an_older_export(backed_up):
    path, kit, _ = backed_up
    doc = json.loads((path / "config").read_bytes())
    doc["format"] = FORMAT_VERSION + 1
    (path / "config").write_text(json.dumps(doc))
    before = objects(path)
    with pytest.raises(UnsupportedFormat):
        Repository.import_key(str(path), kit, PASSWORD)
    assert objects(path) == before


def test_an_export_of_a_key_secret_opens_with_the_secret(tmp_path):
    secret = new_secret()
    repo = Repository.init(str(tmp_path / "repo"), secret)
    kit = repo.export_key()
    repo.close()
    for key in (tmp_path / "repo" / "keys").iterdir():
        key.unlink()
    with pytest.raises(WrongPassword, match="the key in .* does not open with it"):
        Repository.import_key(str(tmp_path / "repo"), kit, PASSWORD)
    with pytest.raises(WrongPassword, match="checksum does not match"):
        Repository.import_key(str(tmp_path / "repo"), kit, secret[:-1])
    copied = b"  " + secret.upper() + b" "  # as every other command takes it (import refused it)
    assert Repository.import_key(str(tmp_path / "repo"), kit, copied).restored[0].startswith("keys/")
    Repository.open(str(tmp_path / "repo"), secret).close()


def test_the_export_holds_the_opening_key_only(tmp_path):
    repo = Repository.init(str(tmp_path / "repo"), PASSWORD, kdf_seconds=0)
    repo.add_key(b"second", kdf_seconds=0)
    repo.close()
    with Repository.open(str(tmp_path / "repo"), b"second") as repo:
        kit = KeyExport.decode(repo.export_key(), "kit")
        assert kit.key_name == repo.store.key_name
    with pytest.raises(WrongPassword):
        kit.unlock(PASSWORD, "kit")
    kit.unlock(b"second", "kit")


def _mutations(kit: bytes) -> list[bytes]:
    doc = json.loads(kit)
    out = [kit[:-40]]
    for field in ("repository", "config", "key"):
        out.append(json.dumps({**doc, field: None}).encode())
        out.append(json.dumps({**doc, field: doc[field][:-3]}).encode())
        out.append(json.dumps({**doc, field: doc[field] + "\u00e9"}).encode())
    out.append(json.dumps({**doc, "repository": "0" * 32}).encode())
    return out


def test_a_damaged_export_is_refused_naming_it(backed_up):
    _, kit, _ = backed_up
    for data in _mutations(kit):
        with pytest.raises(CorruptObject) as err:
            KeyExport.decode(data, "the kit")
        assert err.value.object_name == "the kit"
    doc = json.loads(kit)
    with pytest.raises(UnsupportedFormat, match="upgrade"):
        KeyExport.decode(json.dumps({**doc, EXPORT_MAGIC: 2}).encode(), "the kit")
    for other in (b"", b"[]", b"{}", b"\xff" * 10, b"[" * 100_000, b"snapshot data"):  # exit 17, as import says
        with pytest.raises(UnsupportedFormat, match="is not a chunkvault key export"):
            KeyExport.decode(other, "the kit")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(0, 2000))
def test_any_bytes_decode_or_are_refused_as_damage(junk, cut):
    kit = KeyExport("ab" * 16, b'{"format": 1, "id": "' + b"ab" * 16 + b'", "sealed": "AAAA"}', b"{}").encode()
    for data in (junk, kit[:cut] + junk):
        try:
            KeyExport.decode(data, "kit")
        except (CorruptObject, UnsupportedFormat):
            pass


def test_cli_export_to_a_file_or_standard_output_and_import_from_either(backed_up, tmp_path, cli):
    path, _, src = backed_up
    kit = tmp_path / "kit.json"
    cli("key", "export", "-r", str(path), str(kit), password="pw")
    assert stat.S_IMODE(kit.stat().st_mode) == 0o600
    assert KeyExport.decode(kit.read_bytes(), "kit").repo_id == json.loads(kit.read_bytes())["repository"]
    r = cli("key", "export", "-r", str(path), str(kit), password="pw", check=2)
    assert "exists" in r.stderr.decode() and "--force" in r.stderr.decode()
    cli("key", "export", "-r", str(path), str(kit), "--force", password="pw")
    piped = cli("key", "export", "-r", str(path), password="pw").stdout
    assert piped == kit.read_bytes()
    (key,) = (path / "keys").iterdir()
    key.write_bytes(b"garbage")
    (path / "config").unlink()
    r = cli("snapshots", "-r", str(path), password="pw", check=13)
    assert "`key import FILE`" in r.stderr.decode()
    r = cli("key", "import", "-r", str(path), str(kit), password="wrong", check=11)
    assert "does not open with it" in r.stderr.decode()
    r = cli("key", "import", "-r", str(path), str(tmp_path / "nope"), password="pw", check=2)
    assert "cannot read the key export" in r.stderr.decode()
    (tmp_path / "bad.json").write_text("{}")
    r = cli("key", "import", "-r", str(path), str(tmp_path / "bad.json"), password="pw", check=17)  # no key export: as import
    assert "bad.json" in r.stderr.decode()
    r = cli("key", "import", "-r", str(path), "-", "--json", input=piped, password="pw")
    out = json.loads(r.stdout)  # a config put back may predate a `config set`: the note says so
    assert out == {"id": key.name, "restored": ["config", f"keys/{key.name}"], "note": out["note"]}
    assert "settings of the export's time" in out["note"] and "key remove" not in out["note"]
    r = cli("key", "import", "-r", str(path), str(kit), password="pw")
    assert "nothing to put back" in r.stdout.decode()
    assert restores_exactly(path, src, tmp_path)


def test_a_key_export_cut_short_by_its_file_system_is_a_failure_and_leaves_no_file(backed_up, tmp_path, cli):
    """A write of part of the export (a file size limit, a disk filling as it is written) was taken as all of
    it: the truncated file was renamed into place and reported exported, exit 0, an export that opens nothing."""
    path, _, _ = backed_up
    kit = tmp_path / "kit.json"
    r = cli("key", "export", "-r", str(path), str(kit), password="pw", wrap=("prlimit", "--fsize=300"), check=14)
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and f"writing the key export {kit}" in err, err
    assert not kit.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".kit")] == []
    cli("key", "export", "-r", str(path), str(kit), password="pw")
    assert KeyExport.decode(kit.read_bytes(), "kit").repo_id


def test_import_over_the_backup_service(tmp_path, http_server, monkeypatch):
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    with Repository.init(http_server.url, PASSWORD, kdf_seconds=0, token=FULL_TOKEN) as repo:
        repo.backup([str(src)])
        kit = repo.export_key()
    for key in (http_server.path / "keys").iterdir():
        key.write_bytes(b"garbage")
    (http_server.path / "config").unlink()
    with pytest.raises(ChunkvaultError, match="exclusive lock is for .*key passwd, remove and import") as refused:
        Repository.import_key(http_server.url, kit, PASSWORD, token=APPEND_TOKEN)  # it takes the exclusive lock
    assert refused.value.exit_code == 14 and not (http_server.path / "config").exists()
    result = Repository.import_key(http_server.url, kit, PASSWORD, token=FULL_TOKEN)
    assert sorted(result.restored) == ["config", f"keys/{result.key}"]
    with Repository.open(http_server.url, PASSWORD, token=FULL_TOKEN) as repo:
        out = tmp_path / "out"
        repo.restore("latest", str(out))
        assert describe(out) == describe(src)


@pytest.mark.parametrize("evidence", ["snapshots", "keys"])
def test_another_repositorys_export_puts_no_config_where_the_config_is_lost(backed_up, tmp_path, evidence):
    """Two repositories often share a password: the other's export opened with it, and its config made this
    one's snapshots unreadable (and the right export was refused after)."""
    path, kit, src = backed_up
    other = Repository.init(str(tmp_path / "other"), PASSWORD, kdf_seconds=0)
    wrong = other.export_key()
    other.close()
    (path / "config").unlink()
    target = path
    if evidence == "keys":  # nothing sealed to try there: the key files' clear repository id tells
        target = tmp_path / "bare"
        shutil.copytree(path, target)
        shutil.rmtree(target / "snapshots")
        shutil.rmtree(target / "index")
    before = objects(target)
    with pytest.raises(UsageError, match="not this repository's key export"):
        Repository.import_key(str(target), wrong, PASSWORD)
    assert objects(target) == before
    for where in {target, path}:
        assert Repository.import_key(str(where), kit, PASSWORD).restored == ["config"]
    assert restores_exactly(path, src, tmp_path)


def test_a_key_lost_beside_another_is_put_back_with_a_warning(backed_up, tmp_path):
    """The password's key file lost, a machine key left: only the export and its password were at hand, and
    an import that left the key out locked that operator out (it protected nothing: the export and its
    password read every snapshot)."""
    path, kit, src = backed_up
    (key,) = (path / "keys").iterdir()
    with Repository.open(str(path), PASSWORD) as repo:
        repo.add_key(b"machine", kdf_seconds=0)
    key.unlink()
    with pytest.raises(WrongPassword, match="key import"):
        Repository.open(str(path), PASSWORD)
    result = Repository.import_key(str(path), kit, PASSWORD)
    assert result.restored == [f"keys/{key.name}"] and "key remove" in result.note
    assert restores_exactly(path, src, tmp_path)


@pytest.mark.parametrize("damage", ["cut short", "not a config", "id damaged"])
def test_a_damaged_config_names_key_import(backed_up, damage):
    """The README says so; a config cut short or malformed, or whose id no key file names, did not."""
    path, kit, src = backed_up
    config = path / "config"
    data = config.read_bytes()
    if damage == "cut short":
        config.write_bytes(data[:100])
    elif damage == "not a config":
        config.write_text('{"format": 1}')
    else:
        doc = json.loads(data)
        doc["id"] = ("1" if doc["id"][0] != "1" else "2") + doc["id"][1:]
        config.write_text(json.dumps(doc))
    with pytest.raises(CorruptObject, match=r"key export of this repository puts it back \(`key import FILE`\)"):
        Repository.open(str(path), PASSWORD)


def test_a_key_export_on_standard_input_that_never_ends_is_read_as_a_named_one_is(tmp_path):
    """``key import - < /dev/zero`` was read until memory ran out (an internal error, MemoryError, under a
    limit); a named file is read up to 1 MiB, which holds any key export, and so is standard input now.
    Closed (``<&-``), it is one line too."""
    import resource
    import subprocess
    import sys

    Repository.init(str(tmp_path / "repo"), "pw", kdf_seconds=0).close()
    argv = [sys.executable, "-m", "chunkvault.cli", "key", "import", "-r", str(tmp_path / "repo"), "-"]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}, "CHUNKVAULT_PASSWORD": "pw"}
    with open("/dev/zero", "rb") as zero:
        proc = subprocess.run(argv, stdin=zero, env=env, capture_output=True, timeout=300,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)))
    assert proc.returncode == 17, proc.stderr
    assert proc.stderr.decode().strip() == "chunkvault: standard input is not a chunkvault key export (not JSON)"
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, env=env, capture_output=True, timeout=300,
                          preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2 and proc.stderr.decode().strip() == (
        "chunkvault: cannot read the key export standard input: it is closed")
