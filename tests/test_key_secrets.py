"""Key files: generated key secrets (open without stretching, only with a secret chunkvault made) and passwords."""
import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkvault import Repository, new_secret
from chunkvault.errors import CorruptObject, RemoteUnavailable, WrongPassword
from chunkvault.remotes.local import LocalRemote
from chunkvault.store import config as config_module
from chunkvault.store.config import KDF_ARGON2ID, KDF_SCRYPT, KDF_SECRET, KeyFile, make_key_file
from chunkvault.store.crypto import SECRET_PREFIX, KeyMaterial, derive_secret_kek, encode_secret, is_secret
from chunkvault.store.repository import Repo
from faults import FaultyRemote

REPO_ID = "ab" * 16


def test_new_secrets_are_random_and_recognised():
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith(SECRET_PREFIX) and is_secret(a) and is_secret(b)
    assert len(a) == 63 and a == a.strip() and a.isascii()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.data())
def test_a_changed_or_cut_secret_is_not_a_secret(raw, data):
    text = encode_secret(raw)
    assert is_secret(text)
    # every character but the last carries checked bits (the last one's low bits are base32 padding)
    i = data.draw(st.integers(len(SECRET_PREFIX), len(text) - 2))
    c = data.draw(st.sampled_from(b"abcdefghijklmnopqrstuvwxyz234567").filter(lambda c: c != text[i]))
    assert not is_secret(text[:i] + bytes([c]) + text[i + 1:])
    cut = data.draw(st.integers(0, len(text) - 1))
    assert not is_secret(text[:cut])
    assert not is_secret(text + b"a")


@pytest.mark.parametrize("text", [b"", b"cvk1-", b"cvk1-aaaa", b"password", b"CVK1-" + encode_secret(bytes(32))[5:],
                                  b"cvk1-!!!!", b"cvk1-" + b"a" * 58])
def test_typed_strings_are_passwords(text):
    assert not is_secret(text)
    with pytest.raises(ValueError):
        derive_secret_kek(text, bytes(16))


def test_secret_key_file_has_no_stretching_and_opens_only_with_its_secret():
    material = KeyMaterial.generate()
    secret = new_secret()
    name, data = make_key_file(material, secret, REPO_ID)
    doc = json.loads(data)
    assert doc["kdf"] == KDF_SECRET and not {"log_n", "r", "p", "t", "m"} & doc.keys()
    assert secret.decode() not in data.decode()
    kf = KeyFile.decode(name, data)
    assert kf.kdf == KDF_SECRET and kf.encode() == data
    assert kf.unwrap(secret, REPO_ID) == material
    for wrong in (new_secret(), b"password", secret[:-2]):
        with pytest.raises(WrongPassword):
            kf.unwrap(wrong, REPO_ID)
    with pytest.raises(WrongPassword):  # bound to the repository id
        kf.unwrap(secret, "cd" * 16)


def test_a_password_shaped_like_a_secret_but_invalid_gets_argon2id():
    name, data = make_key_file(KeyMaterial.generate(), b"cvk1-" + b"a" * 58, REPO_ID, kdf_seconds=0)
    assert json.loads(data)["kdf"] == KDF_ARGON2ID


@pytest.mark.parametrize("field, value", [("salt", "%%"), ("salt", None), ("data", 5), ("kdf", "argon9")])
def test_damaged_secret_key_file(field, value):
    name, data = make_key_file(KeyMaterial.generate(), new_secret(), REPO_ID)
    bad = json.dumps({**json.loads(data), field: value}).encode()
    with pytest.raises(Exception) as info:
        KeyFile.decode("", bad).unwrap(new_secret(), REPO_ID)
    assert info.type.__module__.startswith("chunkvault")


def test_opening_with_a_secret_runs_no_password_derivation(tmp_path, monkeypatch):
    url = str(tmp_path / "repo")
    repo = Repository.init(url, "a password", kdf_seconds=0)
    secret = new_secret()
    repo.add_key(secret)
    calls = []
    for name in ("derive_argon2id", "derive_kek"):
        real = getattr(config_module, name)
        monkeypatch.setattr(config_module, name, lambda *a, real=real: calls.append(a) or real(*a))
    opened = Repository.open(url, secret)
    assert calls == [] and opened.store.key_name != repo.store.key_name
    assert {k["kdf"] for k in opened.keys()} == {KDF_ARGON2ID, KDF_SECRET}
    Repository.open(url, "a password")  # the password's key still opens, through Argon2id
    assert len(calls) == 1
    with pytest.raises(WrongPassword):
        Repository.open(url, new_secret())


def test_key_add_derives_no_key_of_another_repository_to_look_for_its_password(tmp_path, monkeypatch):
    """Looking for a key the new password opens already, ``key add`` derived every key, one made for another
    repository (its id in clear) too, which never opens this one: planted at the largest cost allowed, a minute
    at each ``key add`` and ``key passwd``."""
    url = str(tmp_path / "repo")
    repo = Repository.init(url, "a password", kdf_seconds=0)
    with Repository.init(str(tmp_path / "other"), "a password", kdf_seconds=0) as other:
        planted = other.store.key_name
    (tmp_path / "repo" / "keys" / planted).write_bytes((tmp_path / "other" / "keys" / planted).read_bytes())
    tried = []
    real = KeyFile.unwrap
    monkeypatch.setattr(KeyFile, "unwrap", lambda self, *a: tried.append(self.name) or real(self, *a))
    added = repo.add_key("another password", kdf_seconds=0)
    assert tried == [repo.store.key_name] and added not in (planted, repo.store.key_name)


def test_a_repository_made_with_a_secret_backs_up_and_restores(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(50_000))
    secret = new_secret()
    repo = Repository.init(str(tmp_path / "repo"), secret)
    snap = repo.backup([str(src)])
    again = Repository.open(str(tmp_path / "repo"), secret.decode())
    again.restore(snap.snapshot.id, str(tmp_path / "out"))
    assert (tmp_path / "out" / "f").read_bytes() == (src / "f").read_bytes()
    assert [k["kdf"] for k in again.keys()] == [KDF_SECRET]


def test_a_secret_copied_with_blanks_or_in_capitals_opens_and_a_mistyped_one_says_so(tmp_path):
    """A cvk1- string that failed its checksum got the plain "wrong password", after a derivation against
    every password key; one copied with a blank around it did not open."""
    secret = new_secret()
    Repository.init(str(tmp_path / "repo"), secret).close()
    for copied in (b" " + secret + b" \t", secret.upper()):
        Repository.open(str(tmp_path / "repo"), copied).close()
    for typo in (secret[:-1], secret[:20] + (b"a" if secret[20:21] != b"a" else b"b") + secret[21:]):
        with pytest.raises(WrongPassword, match="looks like a generated key secret .* checksum does not match"):
            Repository.open(str(tmp_path / "repo"), typo)
    with pytest.raises(WrongPassword, match="no key of this repository opens with it"):
        Repository.open(str(tmp_path / "repo"), "an ordinary password")
    with Repository.open(str(tmp_path / "repo"), secret) as repo:  # a key made from one copied so is the secret's
        second = new_secret()
        repo.add_key(second + b"\n ", kdf_seconds=0)
        assert sorted(k["kdf"] for k in repo.keys()) == [KDF_SECRET, KDF_SECRET]
    Repository.open(str(tmp_path / "repo"), second).close()


def test_a_secret_file_an_editor_saved_with_a_byte_order_mark_is_still_the_secret(tmp_path, cli):
    """A secret file saved again by an editor that puts UTF-8's byte order mark first (and CR LF) got the plain
    "wrong password": neither the secret's key opened nor the checksum hint was given."""
    secret = new_secret()
    Repository.init(str(tmp_path / "repo"), secret, kdf_seconds=0).close()
    saved = tmp_path / "secret.txt"
    saved.write_bytes(b"\xef\xbb\xbf" + secret + b"\r\n")
    cli("snapshots", "-r", str(tmp_path / "repo"), "--password-file", str(saved), password=None)
    saved.write_bytes(b"\xef\xbb\xbf" + secret[:-1] + b"\r\n")
    proc = cli("snapshots", "-r", str(tmp_path / "repo"), "--password-file", str(saved), password=None, check=11)
    assert "looks like a generated key secret" in proc.stderr.decode()


def test_a_password_key_made_from_a_secret_in_capitals_before_they_opened_as_one_still_opens(tmp_path,
                                                                                           monkeypatch):
    """Such a string used to get an Argon2id password key; taking every password for the secret it spells
    would have left that key unopenable."""
    secret = new_secret()
    url = str(tmp_path / "repo")
    with Repository.init(url, secret) as repo:
        with monkeypatch.context() as before:
            before.setattr(config_module, "as_secret", lambda password: password)
            before.setattr(Repo, "_key_opened_by", lambda self, keys, password: None)  # nor looked for its key
            old = repo.add_key(secret.upper(), kdf_seconds=0)
        secret_key = repo.store.key_name
        repo.add_key("pw", kdf_seconds=0)
    with Repository.open(url, "pw") as repo:
        repo.remove_key(secret_key)
    with Repository.open(url, secret.upper()) as repo:
        assert [k["id"] for k in repo.keys() if k["current"]] == [old]


def test_cli_generate_secret(tmp_path, cli):
    repo = str(tmp_path / "repo")
    secret_file = tmp_path / "secret"
    cli("init", "-r", repo, "--generate-secret", str(secret_file), password=None)
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert is_secret(secret_file.read_bytes().rstrip(b"\n"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("alpha\n")
    cli("backup", "-r", repo, str(src), "--password-file", str(secret_file), password=None)
    env = {"CHUNKVAULT_PASSWORD_FILE": str(secret_file)}
    keys = json.loads(cli("key", "list", "-r", repo, "--json", env=env, password=None).stdout)
    assert [k["kdf"] for k in keys] == ["secret"]
    assert "secret" in cli("key", "list", "-r", repo, env=env, password=None).stdout.decode()

    # a password key beside it; then the secret key is replaced by a new secret
    cli("key", "add", "-r", repo, "--kdf-time", "0", env={**env, "CHUNKVAULT_NEW_PASSWORD": "pw"}, password=None)
    second = tmp_path / "second"
    cli("key", "passwd", "-r", repo, "--generate-secret", str(second), env=env, password=None)
    cli("snapshots", "-r", repo, "--password-file", str(secret_file), password=None, check=11)
    cli("snapshots", "-r", repo, "--password-file", str(second), password=None)
    assert cli("dump", "-r", repo, "latest", "a", password="pw").stdout == b"alpha\n"


def test_cli_never_writes_a_secret_over_a_file_and_removes_one_no_key_uses(tmp_path, cli):
    repo = str(tmp_path / "repo")
    cli("init", "-r", repo, "--kdf-time", "0")
    existing = tmp_path / "existing"
    existing.write_text("keep me\n")
    proc = cli("key", "add", "-r", repo, "--generate-secret", str(existing), check=2)
    assert b"exists" in proc.stderr and existing.read_text() == "keep me\n"
    assert len(json.loads(cli("key", "list", "-r", repo, "--json").stdout)) == 1
    # init over an existing repository fails: the secret written for it is removed again
    orphan = tmp_path / "orphan"
    proc = cli("init", "-r", repo, "--generate-secret", str(orphan), check=10)
    assert b"already exists" in proc.stderr and not orphan.exists()
    proc = cli("init", "-r", str(tmp_path / "r2"), "--generate-secret", str(tmp_path / "no" / "dir" / "s"), check=2)
    assert b"cannot create secret file" in proc.stderr and not (tmp_path / "r2").exists()
    proc = cli("key", "add", "-r", repo, "--generate-secret", str(tmp_path / "x"), "--new-password-file",
               str(existing), check=2)
    assert b"not allowed with" in proc.stderr


def test_a_key_file_of_a_newer_kind_does_not_stop_another_from_opening(tmp_path):
    from chunkvault.errors import UnsupportedFormat
    from chunkvault.store.crypto import content_name

    url = str(tmp_path / "repo")
    repo = Repository.init(url, "pw", kdf_seconds=0)
    future = json.dumps({"kdf": "argon3", "salt": "AAAA", "data": "AAAA"}).encode()
    repo.store.remote.put(f"keys/{content_name(future)[:32]}", future)
    assert Repository.open(url, "pw").store.key_name == repo.store.key_name
    with pytest.raises(UnsupportedFormat):  # nothing opened: the key this password needs may be that one
        Repository.open(url, "another")


def test_a_key_file_of_a_newer_kind_is_listed_checked_and_kept_apart_not_called_damage(tmp_path, cli):
    """A host that upgraded adds a key of a kind this version does not know: the other keys are still
    listed, changed and removed, and check says "not checked" instead of failing."""
    from chunkvault.store.crypto import content_name

    url = str(tmp_path / "repo")
    repo = Repository.init(url, "pw", kdf_seconds=0)
    future = json.dumps({"kdf": "argon3", "salt": "AAAA", "data": "AAAA"}).encode()
    newer = content_name(future)[:32]
    repo.store.remote.put(f"keys/{newer}", future)
    listed = {k["id"]: k for k in Repository.open(url, "pw").keys()}
    assert listed[newer]["kdf"] == "newer" and "upgrade chunkvault" in listed[newer]["problem"]
    env = {"CHUNKVAULT_PASSWORD": "pw"}
    out = cli("key", "list", "-r", url, env=env).stdout.decode()
    assert newer[:12] in out and "upgrade chunkvault" in out and "key remove" not in out
    added = Repository.open(url, "pw").add_key("second", kdf_seconds=0)
    Repository.open(url, "pw").remove_key(added)
    name, _ = Repository.open(url, "pw").change_password("pw2", kdf_seconds=0)
    assert Repository.open(url, "pw2").store.key_name == name
    report = Repository.open(url, "pw2").check()
    assert report.ok and any(f"keys/{newer}" in w and "not checked" in w for w in report.warnings)
    assert newer in {k["id"] for k in Repository.open(url, "pw2").keys()}


def test_a_scrypt_key_file_made_before_argon2id_still_opens(tmp_path):
    from chunkvault.store.crypto import content_name

    url = str(tmp_path / "repo")
    repo = Repository.init(url, "new", kdf_seconds=0)
    name, data = make_key_file(repo.store.material, b"old", repo.store.config.repo_id, log_n=10)
    assert json.loads(data)["kdf"] == KDF_SCRYPT and name == content_name(data)[:32]
    repo.store.remote.put(f"keys/{name}", data)
    assert Repository.open(url, "old").store.key_name == name
    assert Repository.open(url, "new").store.key_name == repo.store.key_name
    with pytest.raises(WrongPassword):
        Repository.open(url, "neither")



def _plant(repo, **fields) -> str:
    """A key file of this repository with ``fields`` changed, stored as anyone who can write the storage
    could; its name."""
    from chunkvault.store.crypto import content_name

    scrypt = fields.get("kdf") == KDF_SCRYPT
    _, data = make_key_file(repo.store.material, b"planted", repo.store.config.repo_id,
                            **({"log_n": 10} if scrypt else {"kdf_seconds": 0}))
    data = json.dumps({**json.loads(data), **fields}).encode()
    name = content_name(data)[:32]
    repo.store.remote.put(f"keys/{name}", data)
    return name


@pytest.mark.parametrize("cost", [
    {"kdf": KDF_ARGON2ID, "t": 1, "m": 1 << 22, "p": 2},  # 4 GiB, which the bounds let through
    {"kdf": KDF_ARGON2ID, "t": 2, "m": 1 << 17, "p": 2},  # 128 MiB
    {"kdf": KDF_ARGON2ID, "t": 2049, "m": 1 << 15, "p": 2},  # 32 MiB, and more passes than the tuning's cap
    {"kdf": KDF_ARGON2ID, "t": 1 << 22, "m": 16, "p": 2},  # 64 GiB over all passes, in 30 minutes of threads
    {"kdf": KDF_SCRYPT, "log_n": 18, "r": 32, "p": 64},  # 1 GiB, 64 GiB over its lanes
    {"kdf": KDF_SCRYPT, "log_n": 19, "r": 9, "p": 1},
], ids=["argon2id 4 GiB", "argon2id 128 MiB", "argon2id passes", "argon2id passes over 16 KiB",
        "scrypt 1 GiB in 64 lanes", "scrypt r 9"])
def test_a_planted_key_file_asking_for_more_than_init_writes_is_skipped_not_derived(tmp_path, monkeypatch, cli,
                                                                                     cost):
    """Every key file is tried with a mistyped password: one planted asking for the most the bounds allowed
    made that cost 4 GiB.  One asking for more than chunkvault writes cannot be chunkvault's: opening skips
    it with a warning naming it, derives nothing for it, and check reports it."""
    from chunkvault.errors import RepositoryStateWarning

    url = str(tmp_path / "repo")
    repo = Repository.init(url, "pw", kdf_seconds=0)
    planted = _plant(repo, **cost)
    derived = []

    def derivation(real):
        def derive(password, salt, *params):
            derived.append(params)
            return bytes(32) if params == tuple(cost[f] for f in config_module.KDF_COST_FIELDS[cost["kdf"]]) else \
                real(password, salt, *params)  # the planted cost is never computed here, fix or not
        return derive

    monkeypatch.setattr(config_module, "derive_argon2id", derivation(config_module.derive_argon2id))
    monkeypatch.setattr(config_module, "derive_kek", derivation(config_module.derive_kek))
    skipped = f"key file keys/{planted} is skipped: its key derivation asks for .* more than chunkvault writes"
    with pytest.warns(RepositoryStateWarning, match=skipped):
        assert Repository.open(url, "pw", ledger=False).store.key_name == repo.store.key_name
    with pytest.warns(RepositoryStateWarning, match=skipped), pytest.raises(WrongPassword):
        Repository.open(url, "mistyped", ledger=False)
    assert len(derived) == 2  # the repository's own key, once for each password
    with pytest.warns(RepositoryStateWarning, match=skipped):
        report = Repository.open(url, "pw", ledger=False).check()
    (problem,) = report.problems
    assert problem.object == f"keys/{planted}" and "more than chunkvault writes" in problem.problem
    err = cli("snapshots", "-r", url, password="pw").stderr.decode()
    assert f"keys/{planted} is skipped" in err and len(err.strip().splitlines()) == 1


def test_a_planted_key_file_alone_is_refused_naming_it(tmp_path):
    url = str(tmp_path / "repo")
    repo = Repository.init(url, "pw", kdf_seconds=0)
    planted = _plant(repo, t=1, m=1 << 22)
    repo.store.remote.delete(f"keys/{repo.store.key_name}")
    with pytest.warns(Warning), pytest.raises(CorruptObject, match=f"keys/{planted}: its key derivation asks"):
        Repository.open(url, "pw", ledger=False)


@pytest.mark.parametrize("salt", ["", "AAAA", "A" * 40])
def test_a_key_file_whose_salt_is_not_16_bytes_is_damaged_not_a_crash(tmp_path, salt):
    """Argon2 refuses a salt under 8 bytes with its own exception: one such key file, planted to be tried
    first, made every open an internal error, with the right password too."""
    url = str(tmp_path / "repo")
    repo = Repository.init(url, "pw", kdf_seconds=0)
    planted = _plant(repo, salt=salt, created="2000-01-01T00:00:00+00:00")
    assert Repository.open(url, "pw", ledger=False).store.key_name == repo.store.key_name
    with pytest.raises(WrongPassword, match=f"keys/{planted}: malformed key file"):
        Repository.open(url, "mistyped", ledger=False)
    (problem,) = Repository.open(url, "pw", ledger=False).check().problems
    assert problem.object == f"keys/{planted}" and problem.problem.startswith("malformed key file")


def test_every_key_init_and_key_add_make_is_within_what_a_reader_derives(tmp_path, monkeypatch):
    """The bounds leave every key chunkvault makes, or made, to open: Argon2id tuned to any --kdf-time up to
    the longest on a machine of any speed, and the scrypt keys of the releases before it."""
    from chunkvault.store import crypto
    from chunkvault.store.config import MAX_KDF_SECONDS

    url = str(tmp_path / "repo")
    Repository.init(url, "pw", kdf_seconds=0.05).close()
    Repository.open(url, "pw", ledger=False).close()
    monkeypatch.setattr(crypto, "derive_argon2id", lambda *args: b"")  # the untimed first derivation
    for per_pass in (1e-6, 1e-3, 0.03, 1.0, 100.0):  # seconds of one pass over 32 MiB
        monkeypatch.setattr(crypto, "_argon2_seconds", lambda t, m, samples, per_pass=per_pass:
                            per_pass * t * m / crypto.ARGON2_MEMORY_KIB)
        for target in (0, 0.001, 0.5, 10, MAX_KDF_SECONDS):
            t, m, p = crypto.tune_argon2id(target)
            kf = KeyFile("k", "", "", "", KDF_ARGON2ID, {"t": t, "m": m, "p": p}, bytes(16), b"")
            assert kf.cost_problem() is None, (per_pass, target, t, m, p)
    # scrypt: N alone tuned to the time (first releases), 64 MiB and 16 lanes, 32 MiB and up to 64 lanes
    for log_n, p in ((17, 1), (18, 1), (19, 1), (16, 16), (15, 64), (17, 64), (19, 64)):
        kf = KeyFile("k", "", "", "", KDF_SCRYPT, {"log_n": log_n, "r": 8, "p": p}, bytes(16), b"")
        assert kf.cost_problem() is None, (log_n, p)


def test_a_cost_just_over_the_bound_is_said_without_rounding_it_away():
    """65537 KiB read "over 64 MiB ... (at most 64 MiB)"."""
    from chunkvault.store.config import ARGON2_MAX_MEMORY_KIB, KeyFile

    kf = KeyFile("k", "", "", "", KDF_ARGON2ID, {"t": 1, "m": ARGON2_MAX_MEMORY_KIB + 1, "p": 1}, bytes(16), b"", "")
    assert kf.cost_problem() == (f"its key derivation asks for Argon2id over {ARGON2_MAX_MEMORY_KIB + 1} KiB, "
                                 f"1 time(s) ({ARGON2_MAX_MEMORY_KIB + 1} KiB over all passes), more than chunkvault "
                                 "writes (at most 64 MiB, and 64 GiB over all passes)")


class _KeyReads(FaultyRemote):
    """Cuts the reads of key files short (``cut``), or fails the listing of keys (``fail``)."""

    def __init__(self, inner):
        super().__init__(inner, seed=0)
        self.cut = self.fail = False

    def list(self, prefix=""):
        if self.fail and prefix == "keys/":
            raise RemoteUnavailable("storage out of reach")
        return super().list(prefix)

    def get(self, key, start=None, length=None):
        data = super().get(key, start, length)
        return data[: len(data) // 2] if self.cut and key.startswith("keys/") else data


def test_a_key_change_that_cannot_read_the_keys_says_nothing_changed_not_that_another_command_did(tmp_path):
    """Its own key read cut short, a password change said the key was "gone (another command replaced it)"
    and told to use the password that command set, where there was none; the keys' listing failing, it did
    not say the password was unchanged.  Either way the old password opens the repository."""
    remote = _KeyReads(LocalRemote(str(tmp_path / "repo")))
    with Repository.init(remote, "old", kdf_seconds=0, ledger=False) as repo:
        other = repo.add_key("other", kdf_seconds=0)
        remote.cut = True
        with pytest.raises(CorruptObject, match="the password is unchanged$"):
            repo.change_password("new", kdf_seconds=0)
        with pytest.raises(CorruptObject, match="nothing removed$"):
            repo.remove_key(other)
        remote.cut, remote.fail = False, True
        with pytest.raises(RemoteUnavailable, match="the password is unchanged$"):
            repo.change_password("new", kdf_seconds=0)
        remote.fail = False
        assert len(repo.keys()) == 2
    Repository.open(str(tmp_path / "repo"), "old", ledger=False).close()


class _Counted(LocalRemote):
    """The bytes each read of a key file returned."""

    def __init__(self, path: str, reads: list[int]):
        super().__init__(path)
        self.reads = reads

    def get(self, key, start=None, length=None):
        data = super().get(key, start, length)
        if key.startswith("keys/"):
            self.reads.append(len(data))
        return data


def test_an_oversized_file_among_the_key_files_is_damage_not_read_whole(tmp_path, cli):
    """Key files are a few hundred bytes; one of gigabytes planted in keys/ (or grown so) was read whole by
    every command opening the repository, and by `key list` and `key remove`, which are there to remove it:
    each needed its size in memory.  Now none reads past the limit: the other keys open, and it is damage."""
    from chunkvault.store.config import KEY_FILE_LIMIT
    from chunkvault.store.keyexport import export_key
    from chunkvault.store.objects import key_json

    url = str(tmp_path / "repo")
    Repository.init(url, "pw", kdf_seconds=0).close()
    planted = "f" * 32
    with open(tmp_path / "repo" / "keys" / planted, "wb") as f:
        f.truncate(64 << 20)  # sparse: what matters is what is read of it
    reads: list[int] = []
    remote = _Counted(url, reads)
    repo = Repo.open(remote, b"pw")
    assert max(reads) <= KEY_FILE_LIMIT + 1
    _, damaged = repo.list_keys()
    assert "over 64 KiB" in damaged[planted].reason
    with pytest.raises(WrongPassword):
        Repo.open(remote, b"mistyped")
    (problem,) = Repository.open(url, "pw", ledger=False).check().problems
    assert problem.object == f"keys/{planted}" and "over 64 KiB" in problem.problem
    with pytest.raises(CorruptObject, match="over 64 KiB"):
        key_json(remote, planted)
    assert export_key(remote, repo.key_name).key
    assert reads and max(reads) <= KEY_FILE_LIMIT + 1
    out = cli("key", "list", "--json", "-r", url, password="pw").stdout
    assert {k["id"]: k.get("kdf") for k in json.loads(out)}[planted] == "damaged"
    cli("key", "remove", planted[:8], "-r", url, password="pw")
    assert not os.path.exists(tmp_path / "repo" / "keys" / planted)


def test_key_list_and_check_name_the_key_files_that_open_nothing_here(tmp_path, cli):
    """A key file copied from another repository (its id in clear) and one asking for more derivation than
    chunkvault writes are never opened with; `key list` showed both as keys of the repository, and check
    said nothing of the copy.  Each now carries its problem and what removes it."""
    url, other = str(tmp_path / "repo"), str(tmp_path / "other")
    repo = Repository.init(url, "pw", kdf_seconds=0)
    Repository.init(other, "pw", kdf_seconds=0).close()
    (copied,) = os.listdir(os.path.join(other, "keys"))
    with open(os.path.join(other, "keys", copied), "rb") as f:
        repo.store.remote.put(f"keys/{copied}", f.read())
    costly = _plant(repo, t=1, m=1 << 22)
    listed = {k["id"]: k for k in json.loads(cli("key", "list", "--json", "-r", url, password="pw").stdout)}
    assert "another repository" in listed[copied]["problem"]
    assert "more than chunkvault writes" in listed[costly]["problem"]
    assert "problem" not in listed[repo.store.key_name]
    text = cli("key", "list", "-r", url, password="pw").stdout.decode()
    assert f"`key remove {copied[:12]}`" in text and f"`key remove {costly[:12]}`" in text
    with pytest.warns(Warning):
        report = Repository.open(url, "pw", ledger=False).check()
    assert [w for w in report.warnings if w.startswith(f"keys/{copied}: made for another repository")]
