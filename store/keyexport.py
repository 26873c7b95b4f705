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

import json
from dataclasses import dataclass

from chunkvault.errors import CorruptObject, ObjectNotFound, UnsupportedFormat, UsageError, WrongPassword
from chunkvault.remotes import Remote

from .config import KeyFile, RepoConfig, open_config, peek_config
from .crypto import KeyMaterial, Sealer, content_name
from .unlock import missing_config, repository_objects

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
        """The export in ``data``; CorruptObject names ``what`` (the file) for anything else."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise CorruptObject(what, "not a chunkvault key export (not JSON)") from None
        if not isinstance(obj, dict) or EXPORT_MAGIC not in obj:
            raise CorruptObject(what, "not a chunkvault key export")
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
        try:
            material = KeyFile.decode(self.key_name, self.key).unwrap(password, self.repo_id)
        except WrongPassword:
            raise WrongPassword(f"wrong password: the key in {what} does not open with it") from None
        try:
            return material, open_config(self.config, Sealer(material.enc_key))
        except CorruptObject as exc:
            raise CorruptObject(what, f"its config does not authenticate under its key ({exc.reason})") from None


def export_key(remote: Remote, key_name: str) -> KeyExport:
    """The export of ``key_name`` (the key a repository was opened with) and the config as stored now."""
    config = remote.get("config")
    return KeyExport(peek_config(config)["id"], config, remote.get(f"keys/{key_name}"))


@dataclass(frozen=True)
class KeyImport:
    """What ``import_key`` put back: ``restored`` names the objects written (none when all were whole)."""

    key: str
    restored: list[str]


def import_key(remote: Remote, export: KeyExport, password: bytes, what: str) -> KeyImport:
    """Put back the exported key file and config where the repository at ``remote`` lacks them or holds
    them damaged.  Refuses a repository with another id, and a location without repository objects (an
    export alone makes no repository)."""
    material, _ = export.unlock(password, what)
    restored = []
    try:
        stored_config: bytes | None = remote.get("config")
    except ObjectNotFound:
        if not repository_objects(remote):
            raise missing_config(remote) from None
        stored_config = None
    if stored_config is not None and not _config_whole(stored_config, export, material, remote.display_url):
        stored_config = None
    if stored_config is None:
        remote.put("config", export.config)
        restored.append("config")
    key = f"keys/{export.key_name}"
    try:
        whole = remote.get(key) == export.key
    except ObjectNotFound:
        whole = False
    if not whole:
        remote.put(key, export.key)
        restored.append(key)
    return KeyImport(export.key_name, restored)


def _config_whole(stored: bytes, export: KeyExport, material: KeyMaterial, where: str) -> bool:
    """Whether the stored config is this repository's and authentic (then it stays: it may hold settings
    changed since the export).  Another repository's config is refused, not replaced, and so is a newer
    format's (UnsupportedFormat), which an older export must not undo."""
    try:
        stored_id = peek_config(stored)["id"]
    except CorruptObject:
        return False
    if stored_id != export.repo_id:
        raise UsageError(f"this key export belongs to repository {export.repo_id[:16]}, not to the one at "
                         f"{where} ({stored_id[:16]}): nothing imported")
    try:
        open_config(stored, Sealer(material.enc_key))
    except CorruptObject:
        return False
    return True
