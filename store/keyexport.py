"""Key exports: the two objects that open a repository, kept outside it.

Every byte a repository stores is sealed under the secret its key files wrap,
so losing the key files (or the config, which says how the repository was
made) loses all of it, however many packs survive.  A key export holds one
key file and the config exactly as stored; ``key import`` puts back whichever
of them the repository lost or holds damaged, once the password has opened the
exported key and that key has authenticated the exported config.  An export is
as secret as the key file it holds (the password protects both).
"""
from __future__ import annotations

import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from chunkvault.errors import CorruptObject, NewerObject, ObjectNotFound, UnsupportedFormat, UsageError, WrongPassword
from chunkvault.remotes import Remote

from .config import FORMAT_WAL, FORMAT_XATTRS, KeyFile, RepoConfig, open_config, peek_config, settings_differences
from .crypto import KeyMaterial, Sealer, content_name, looks_like_secret
from .indexfile import decode_index_columns
from .locks import EXCLUSIVE, RepoLock
from .repository import OBJECT_READERS
from .snapshot import Snapshot
from .unlock import MISTYPED_SECRET, missing_config, password_for, read_key_file, repository_objects
from .walnames import WAL_PREFIX, is_wal_name

EXPORT_MAGIC = "chunkvault key export"
EXPORT_VERSION = 1


@dataclass(frozen=True)
class KeyExport:
    """A decoded export: the repository id and the exact bytes of its config and of one key file."""

    repo_id: str
    config: bytes
    key: bytes

    @property
    def key_name(self) -> str:
        return content_name(self.key)[:32]

    def encode(self) -> bytes:
        return (json.dumps({EXPORT_MAGIC: EXPORT_VERSION, "repository": self.repo_id,
                            "config": self.config.decode("ascii"), "key": self.key.decode("ascii")},
                           indent=1) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, what: str) -> "KeyExport":
        """The export in ``data``; UnsupportedFormat for a file that is no key export (as ``import`` calls a
        file that is no export file, exit 17), CorruptObject naming ``what`` (the file) for a damaged one."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            if EXPORT_MAGIC.encode() in data[:200]:  # the start of one, cut short or damaged after it
                raise CorruptObject(what, "damaged key export (not whole JSON)") from None
            raise UnsupportedFormat(f"{what} is not a chunkvault key export (not JSON)") from None
        if not isinstance(obj, dict) or EXPORT_MAGIC not in obj:
            raise UnsupportedFormat(f"{what} is not a chunkvault key export")
        if obj[EXPORT_MAGIC] != EXPORT_VERSION:
            raise UnsupportedFormat(f"{what}: key export version {obj[EXPORT_MAGIC]!r} is not one this "
                                    "chunkvault reads; upgrade chunkvault")
        fields = [obj.get(k) for k in ("repository", "config", "key")]
        if not all(isinstance(f, str) and f for f in fields) or not all(f.isascii() for f in fields):
            raise CorruptObject(what, "malformed key export")
        repo_id, config, key = fields
        export = cls(repo_id, config.encode("ascii"), key.encode("ascii"))
        try:
            if peek_config(export.config)["id"] != repo_id:
                raise CorruptObject(what, "its config belongs to another repository than it names")
            kf = KeyFile.decode(export.key_name, export.key)
        except CorruptObject as exc:
            if exc.object_name == what:
                raise
            raise CorruptObject(what, f"damaged ({exc.object_name}: {exc.reason})") from None
        if kf.repo and kf.repo != repo_id:
            raise CorruptObject(what, "its key belongs to another repository than it names")
        return export

    def unlock(self, password: bytes, what: str) -> tuple[KeyMaterial, RepoConfig]:
        """The key material the password opens and the config it authenticates; WrongPassword when it
        does not open the exported key."""
        kf = KeyFile.decode(self.key_name, self.key)
        try:
            material = kf.unwrap(password_for(kf, password), self.repo_id)
        except WrongPassword:
            why = MISTYPED_SECRET if looks_like_secret(password) else f"the key in {what} does not open with it"
            raise WrongPassword(f"wrong password: {why}") from None
        try:
            return material, open_config(self.config, Sealer(material.enc_key))
        except CorruptObject as exc:
            raise CorruptObject(what, f"its config does not authenticate under its key ({exc.reason})") from None


def export_key(remote: Remote, key_name: str) -> KeyExport:
    """The export of ``key_name`` (the key a repository was opened with) and the config as stored now."""
    config = remote.get("config")
    return KeyExport(peek_config(config)["id"], config, read_key_file(remote, key_name))


@dataclass(frozen=True)
class KeyImport:
    """What ``import_key`` put back: ``restored`` names the objects written (none when all were whole);
    ``note`` warns of a key put back where it was absent beside other keys (retired on purpose?), of a config
    put back with the settings as exported, and names the settings a kept config changed since the export."""

    key: str
    restored: list[str]
    note: str = ""


#: Snapshot or index objects tried, each, for a sign that the repository is the export's.
EVIDENCE_OBJECTS = 3


def import_key(remote: Remote, export: KeyExport, password: bytes, what: str, *, wait: float = 3600.0) -> KeyImport:
    """Put back the exported config and key where the repository at ``remote`` lacks them or holds them
    damaged (a key absent beside other keys with a note: it may have been retired).  Refuses a repository
    that is not the export's (another id; objects that do not open under the exported key), and a location
    without repository objects (an export alone makes no repository).  Under the exclusive lock, as key
    passwd."""
    material, exported = export.unlock(password, what)
    if remote.stat("config") is None and not repository_objects(remote).own:
        raise missing_config(remote)  # before the lock, which would be the first object there
    with RepoLock(remote, EXCLUSIVE, "key import", wait=wait):
        restored, notes = [], []
        try:
            stored_config: bytes | None = remote.get("config")
        except ObjectNotFound:
            stored_config = None
        if stored_config is not None and not _config_whole(stored_config, export, material):
            stored_config = None
        if stored_config is None:
            _require_same_repository(remote, export, material, what)
            remote.put("config", _config_for(remote, export.config, exported, material))
            restored.append("config")
            notes.append("the config put back has the settings of the export's time: one changed since by `config "
                         "set` is as it was then (`chunkvault config` shows them)")
        elif stored_config != export.config:
            now = open_config(stored_config, Sealer(material.enc_key)).settings
            differences = settings_differences(exported.settings, now)
            if differences:  # kept: an export must not undo a `config set` made since
                notes.append("the repository's config is kept, with settings changed since the export ("
                             + ", ".join(f"{n} {old!r} then, {new!r} now" for n, (old, new) in differences.items())
                             + ")")
        key = f"keys/{export.key_name}"
        try:
            stored_key: bytes | None = read_key_file(remote, export.key_name)
        except ObjectNotFound:
            stored_key = None
        except CorruptObject:  # too large to be a key file: damaged, put back
            stored_key = b""
        if stored_key != export.key:
            if stored_key is None and _own_keys(remote, export.repo_id):
                # Lost, or removed on purpose: the export and its password read every snapshot either way, so
                # a key left out would protect nothing, and leave whoever has only that password locked out.
                notes.append(f"key {export.key_name[:12]} was not there beside the repository's other keys: if "
                             f"`key passwd` or `key remove` retired it, `key remove {export.key_name[:12]}` again")
            remote.put(key, export.key)
            restored.append(key)
        return KeyImport(export.key_name, restored, "; ".join(notes))


def _config_for(remote: Remote, raw: bytes, config: RepoConfig, material: KeyMaterial) -> bytes:
    """The exported config as it is put back: at format 2 where what a chunkvault of format 1 misreads is
    stored and the export is from before it, so that such a chunkvault still refuses the repository: WAL
    archived (``FORMAT_WAL``: its prune would delete the archive's data), or a snapshot of version 2
    (``FORMAT_XATTRS``: its forget would remove that snapshot's parent)."""
    fmt = config.format
    if fmt < FORMAT_WAL and any(is_wal_name(o.key[len(WAL_PREFIX):]) for o in remote.list(WAL_PREFIX)):
        fmt = FORMAT_WAL
    if fmt < FORMAT_XATTRS and _holds_snapshots_of_version_2(remote, Sealer(material.enc_key)):
        fmt = FORMAT_XATTRS
    if fmt == config.format:
        return raw
    config.format = fmt
    return config.encode(Sealer(material.enc_key))


def _holds_snapshots_of_version_2(remote: Remote, sealer: Sealer) -> bool:
    """Whether a snapshot of version 2 or newer is stored (one that does not open under this key is left to
    ``check``).  Read newest first, since the newest is where one would be, and a few at a time, stopping at the
    first found: read one by one, a remote 50 ms away took 14 minutes over a year of hourly snapshots of
    version 1, and that at the moment a user is putting back a lost config."""
    listed = sorted(remote.list("snapshots/"), key=lambda o: o.modified or 0.0, reverse=True)

    def version_2(key: str) -> bool:
        try:
            return Snapshot.decode(sealer, key.split("/", 1)[1], remote.get(key)).version >= 2
        except NewerObject:
            return True
        except (CorruptObject, ObjectNotFound):
            return False

    with ThreadPoolExecutor(OBJECT_READERS) as pool:
        for start in range(0, len(listed), OBJECT_READERS):
            if any(pool.map(version_2, [o.key for o in listed[start:start + OBJECT_READERS]])):
                return True
    return False


def _key_files(remote: Remote) -> list[KeyFile]:
    """The repository's key files that decode."""
    out = []
    for o in remote.list("keys/"):
        try:
            name = o.key.split("/", 1)[1]
            out.append(KeyFile.decode(name, read_key_file(remote, name)))
        except (CorruptObject, ObjectNotFound):
            continue
    return out


def _own_keys(remote: Remote, repo_id: str) -> set[str]:
    """The key files that decode and name ``repo_id`` (or no repository, as the oldest do)."""
    return {kf.name for kf in _key_files(remote) if not kf.repo or kf.repo == repo_id}


def _require_same_repository(remote: Remote, export: KeyExport, material: KeyMaterial, what: str) -> None:
    """Before a config is put where there is none (or a damaged one): the repository's own objects must open
    under the exported key, or where it has none to try, its key files must name the export's repository.
    Two repositories often share a password: another's export put its config here, and then nothing read."""
    sealer = Sealer(material.enc_key)
    tried = 0
    for prefix, opens in (("snapshots/", lambda name, data: Snapshot.decode(sealer, name, data)),
                          ("index/", lambda name, data: decode_index_columns(sealer, data, f"index/{name}"))):
        for o in itertools.islice(remote.list(prefix), EVIDENCE_OBJECTS):
            name = o.key.split("/", 1)[1]
            tried += 1
            try:
                opens(name, remote.get(o.key))
                return
            except (CorruptObject, ObjectNotFound):
                continue
    others = {kf.repo for kf in _key_files(remote) if kf.repo and kf.repo != export.repo_id}
    if tried or others:
        why = (f"its key files name repository {sorted(others)[0][:16]}" if others else
               f"none of {tried} of its snapshot and index objects opens under the exported key")
        raise UsageError(f"{what} is not this repository's key export ({why}; the export is of "
                         f"{export.repo_id[:16]}): nothing imported")


def _config_whole(stored: bytes, export: KeyExport, material: KeyMaterial) -> bool:
    """Whether the stored config is this repository's and authentic (then it stays: it may hold settings
    changed since the export).  A newer format's is refused (UnsupportedFormat): an older export must not
    undo it.  One naming another id is not whole: another repository's, whose objects then refuse the
    exported key (``_require_same_repository``), or this one's with its id damaged."""
    try:
        stored_id = peek_config(stored)["id"]
    except CorruptObject:
        return False
    if stored_id != export.repo_id:
        return False
    try:
        open_config(stored, Sealer(material.enc_key))
    except CorruptObject:
        return False
    return True
