"""Unlocking a repository: finding the key file the password opens.

The one step of opening that needs the password, kept apart from the rest of
the store (and its heavy imports): the derivation's memory (32 MiB) is then the
largest thing alive while it runs, instead of coming on top of every module
a command needs, which keeps a command's peak memory down.  Off local disk
the derivation may already be under way (``keyahead``), beside the remote's
connection rather than the store's modules.
"""
from __future__ import annotations

import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from chunkvault.errors import (ChunkvaultError, CorruptObject, NewerObject, ObjectNotFound, RepositoryNotFound,
                               RepositoryStateWarning, UnsupportedFormat, WrongPassword)
from chunkvault.remotes import Remote

from .config import KDF_SECRET, KEY_FILE_LIMIT, KeyFile, RepoConfig, open_config, peek_config
from .crypto import KeyMaterial, Sealer, as_secret, looks_like_secret
from .keyahead import KeyAhead


class Unlocked(NamedTuple):
    """What the password opened: the key material, the authenticated config and the key file's name."""

    material: KeyMaterial
    config: RepoConfig
    key_name: str


#: Where a key file or the config is lost or damaged: the way back, for whoever kept a key export.
KEY_IMPORT_HINT = "; a key export of this repository puts it back (`key import FILE`)"

REPOSITORY_DIRS = ("keys/", "data/", "index/", "snapshots/", "wal/")


class Leftovers(NamedTuple):
    """What a location's repository directories hold: objects of a repository of its own (the directories
    holding them), and other repositories made below it in one of them (their keys' prefixes, ``keys``)."""

    own: list[str]
    nested: list[str]


def repository_objects(remote: Remote) -> Leftovers:
    """Which of a repository's directories hold objects of their own (each listed until its first), and
    which repositories lie in them.  An object of a repository made at ``.../keys`` (its ``keys/config``)
    counted as this location's: it was then called a repository that lost its config, and the hint said
    that removing keys/ would let init run, the other repository with it."""
    own: list[str] = []
    nested: list[str] = []
    configs: dict[str, bool] = {}

    def holds_config(prefix: str) -> bool:
        if prefix not in configs:
            configs[prefix] = remote.stat(f"{prefix}/config") is not None
            if configs[prefix]:
                nested.append(prefix)
        return configs[prefix]

    for d in REPOSITORY_DIRS:
        for o in remote.list(d):
            parts = o.key.split("/")
            if _shaped_as_own(d, parts) or not any(holds_config("/".join(parts[:n])) for n in range(1, len(parts))):
                own.append(d)
                break
    return Leftovers(own, nested)


def _shaped_as_own(directory: str, parts: list[str]) -> bool:
    """Whether an object's key has the shape of ``directory``'s own objects (``data/ab/ID``, ``keys/NAME``),
    and is no config: only others are looked above for a config (a name no object has, which a backup
    service would refuse to be asked about).  A pack's folder is two hex digits: a repository made at
    ``.../data`` has its ``data/keys/NAME`` and ``data/index/ID`` at a pack's depth, which were taken for
    this location's own."""
    if directory == "data/":
        return len(parts) == 3 and _PACK_FOLDER.fullmatch(parts[1]) is not None and parts[-1] != "config"
    return len(parts) == 2 and parts[-1] != "config"


_PACK_FOLDER = re.compile(r"[0-9a-f]{2}")


def nested_hint(remote: Remote, nested: list[str]) -> str:
    return ", ".join(f"{remote.display_url.rstrip('/')}/{prefix}" for prefix in nested)


def only_keys_hint(found: list[str]) -> str:
    """Where a location without a config holds key files alone: no backup is there to lose (an init stopped
    between its key file and its config, a kill say)."""
    return ("; it holds no backup (no data, index or snapshots): an init stopped before it wrote its config "
            "leaves that, and removing keys/ there lets init run again" if found == ["keys/"] else "")


def missing_config(remote: Remote) -> Exception:
    """The error for a location without a config: no repository, or one that lost its config (then
    nothing must be created over it, and no hint may lead to deleting what it holds but key files alone)."""
    found = repository_objects(remote)
    if not found.own:
        return RepositoryNotFound(f"no repository at {remote.display_url}" + (
            f" (another lies below it, at {nested_hint(remote, found.nested)})" if found.nested else ""))
    return CorruptObject("config", f"missing at {remote.display_url}, which holds repository objects "
                                   f"({', '.join(found.own)}); put back a copy of the config file{KEY_IMPORT_HINT}"
                                   f"{only_keys_hint(found.own)}")


def no_key_files() -> CorruptObject:
    return CorruptObject("keys", "the repository has no key files; a key export of this repository puts one back "
                                 "(`key import FILE`)")


def read_config(remote: Remote) -> tuple[bytes, dict]:
    """The stored config and its clear part; one missing or damaged is explained (``key import`` puts it back)."""
    try:
        raw = remote.get("config")
    except ObjectNotFound:
        raise missing_config(remote) from None
    try:
        return raw, peek_config(raw)
    except CorruptObject as exc:
        raise exc.explained(KEY_IMPORT_HINT) from None


def read_key_file(remote: Remote, name: str) -> bytes:
    """The bytes of ``keys/<name>``, read no further than ``KEY_FILE_LIMIT``: a CorruptObject past it, as for
    any key file that does not decode (the other keys still open; `key remove` removes it)."""
    data = remote.get(f"keys/{name}", 0, KEY_FILE_LIMIT + 1)
    if len(data) > KEY_FILE_LIMIT:
        raise CorruptObject(f"keys/{name}", f"over {KEY_FILE_LIMIT >> 10} KiB, where a key file holds a few hundred "
                                            "bytes: not chunkvault's (not read further)")
    return data


def _key_names(remote: Remote) -> list[str]:
    return sorted(o.key.split("/", 1)[1] for o in remote.list("keys/"))


def read_config_and_keys(remote: Remote) -> tuple[tuple[bytes, dict], list[str] | None]:
    """``read_config``, and the names of the key files, listed meanwhile (None where the listing failed: the
    caller lists again, and says why): one after the other, the two were two round trips of every opening,
    and of every lock's check that the repository is still there (``require_openable``)."""
    with ThreadPoolExecutor(1) as pool:
        listing = pool.submit(_key_names, remote)
        config = read_config(remote)
        try:
            names = listing.result()
        except ChunkvaultError:
            names = None
    return config, names


def require_openable(remote: Remote, repo_id: str) -> bytes:
    """The config as stored; CorruptObject when it or every key file is gone, or the config is another
    repository's (one made anew at the same place): what a process holding the repository open since would
    store could never be read again."""
    (raw, clear), names = read_config_and_keys(remote)
    stored = clear["id"]
    if stored != repo_id:
        raise CorruptObject("config", f"names repository {stored[:16]}, not {repo_id[:16]}: another repository "
                                      f"was made at {remote.display_url} since this one was opened")
    if not (names if names is not None else _key_names(remote)):
        raise no_key_files()
    return raw


MISTYPED_SECRET = ("it looks like a generated key secret (cvk1-...), but its checksum does not match: a character "
                   "is wrong or missing")


def password_for(kf: KeyFile, password: bytes) -> bytes:
    """What opens ``kf``: a secret's key file takes the secret as copied (with blanks, in capitals), a
    password's key file the bytes given."""
    return as_secret(password) if kf.kdf == KDF_SECRET else password


def unlock(remote: Remote, password: bytes, ahead: KeyAhead | None = None, *,
           config: tuple[bytes, dict] | None = None, key_names: list[str] | None = None) -> Unlocked:
    """Try each key file with ``password``; errors say whether the password or the repository is wrong.

    ``ahead``: a derivation already under way (``keyahead``); the key file that opens is remembered in it.
    ``config``: what ``read_config`` returned for this remote just before (a command that reads it first, to
    report a damaged repository before asking for a password): read again, it cost every command a round trip.
    ``key_names``: the key files listed with it (``read_config_and_keys``)."""
    if config is None:
        config, key_names = read_config_and_keys(remote)
    raw_config, clear = config
    key_names = _key_names(remote) if key_names is None else list(key_names)
    if not key_names:
        raise no_key_files()
    corrupt: CorruptObject | None = None
    beyond: CorruptObject | None = None
    other_ids = set()
    unsupported: NewerObject | None = None
    keys = []
    raws: dict[str, bytes] = {}
    relisted = False
    for name in key_names:  # grows once where a key file listed is gone: see below
        try:
            raws[name] = read_key_file(remote, name)
            kf = KeyFile.decode(name, raws[name])
        except NewerObject as exc:  # a key of a newer version: another key may still open
            unsupported = exc
            continue
        except ObjectNotFound:
            # Gone since the listing, which a command makes before asking for the password: a `key passwd`
            # run while this one waited at the prompt replaced it, under a name listed only now.
            if not relisted:
                relisted = True
                key_names += [n for n in _key_names(remote) if n not in key_names]
            continue
        except CorruptObject as exc:
            corrupt = exc
            continue
        problem = kf.cost_problem()
        if problem is not None:  # planted, not ours: deriving it would cost every mistyped password that much
            beyond = CorruptObject(f"keys/{name}", problem)
            warnings.warn(f"key file keys/{name} is skipped: {problem}", RepositoryStateWarning, stacklevel=2)
            continue
        if kf.repo and kf.repo != clear["id"]:
            other_ids.add(kf.repo)
        keys.append(kf)
    if ahead is not None:
        ahead.drop_unless_held(raws.values())
    # Cheapest first (a secret costs microseconds, a password about 0.5 s of CPU) and this repository's before
    # any other's: a key file planted with the largest cost the bounds allow (a minute) is tried last.  Among
    # passwords' keys, the one derived ahead (that opened last time) first: its key is derived already, and key
    # files added cheaper than it (an append-only client may add keys) each cost a derivation, tried before it.
    remembered = ahead.raw if ahead is not None else None
    for kf in sorted(keys, key=lambda k: (k.kdf != KDF_SECRET, raws[k.name] != remembered,
                                          bool(k.repo) and k.repo != clear["id"], k.work)):
        kek = ahead.kek_for(raws[kf.name]) if ahead is not None else None
        try:
            material = (kf.open_with(kek, clear["id"]) if kek is not None else
                        kf.unwrap(password_for(kf, password), clear["id"]))
        except WrongPassword:
            continue
        except CorruptObject as exc:
            corrupt = exc
            continue
        try:
            config = open_config(raw_config, Sealer(material.enc_key))
        except CorruptObject as exc:
            raise exc.explained(KEY_IMPORT_HINT) from None
        unlocked = Unlocked(material, config, kf.name)
        if ahead is not None and kf.kdf != KDF_SECRET:
            ahead.remember(raws[kf.name])
        return unlocked
    if corrupt is not None and len(key_names) == 1:
        raise corrupt.explained(KEY_IMPORT_HINT)
    if beyond is not None and len(key_names) == 1:
        raise beyond.explained(KEY_IMPORT_HINT)
    if unsupported is not None:  # the key this password opens may be that one: an upgrade would tell
        raise UnsupportedFormat(f"{unsupported}: no other key opens with this password, so it is the password's "
                                "key or the password is wrong")
    # Another repository's key file, planted or copied here, says nothing against the password while this
    # repository's own keys are there: they refused it.
    own = [kf for kf in keys if not kf.repo or kf.repo == clear["id"]]
    if other_ids and not own:
        raise CorruptObject("config", "its id does not match the key files' (the config is damaged, "
                                      f"or the keys belong to another repository){KEY_IMPORT_HINT}")
    if corrupt is not None:  # the key this password opens may be the damaged one
        raise WrongPassword(f"wrong password, or the key it opens is damaged (no other key of this repository "
                            f"opens with it; {corrupt.object_name}: {corrupt.reason}){KEY_IMPORT_HINT}")
    if looks_like_secret(password):
        raise WrongPassword(f"wrong password: {MISTYPED_SECRET}")
    raise WrongPassword("wrong password (no key of this repository opens with it; if its key file was lost, a "
                        "key export of it puts it back: `key import FILE`)")
