"""Unlocking a repository: finding the key file the password opens.

The one step of opening that needs the password, kept apart from the rest of
the store (and its heavy imports): the derivation's memory (32 MiB) is then the
largest thing alive while it runs, instead of coming on top of every module
a command needs, which keeps a command's peak memory down.
"""
from __future__ import annotations

from typing import NamedTuple

from chunkvault.errors import CorruptObject, ObjectNotFound, RepositoryNotFound, UnsupportedFormat, WrongPassword
from chunkvault.remotes import Remote

from .config import KDF_SECRET, KeyFile, RepoConfig, open_config, peek_config
from .crypto import KeyMaterial, Sealer


class Unlocked(NamedTuple):
    """What the password opened: the key material, the authenticated config and the key file's name."""

    material: KeyMaterial
    config: RepoConfig
    key_name: str


def unlock(remote: Remote, password: bytes) -> Unlocked:
    """Try each key file with ``password``; errors say whether the password or the repository is wrong."""
    try:
        raw_config = remote.get("config")
    except ObjectNotFound:
        raise RepositoryNotFound(f"no repository at {remote.display_url}") from None
    clear = peek_config(raw_config)
    key_names = sorted(o.key.split("/", 1)[1] for o in remote.list("keys/"))
    if not key_names:
        raise CorruptObject("keys", "the repository has no key files")
    corrupt: CorruptObject | None = None
    other_ids = set()
    unsupported: UnsupportedFormat | None = None
    keys = []
    for name in key_names:
        try:
            kf = KeyFile.decode(name, remote.get(f"keys/{name}"))
        except (CorruptObject, ObjectNotFound) as exc:
            corrupt = exc if isinstance(exc, CorruptObject) else None
            continue
        except UnsupportedFormat as exc:  # a key of a newer version: another key may still open
            unsupported = exc
            continue
        if kf.repo and kf.repo != clear["id"]:
            other_ids.add(kf.repo)
        keys.append(kf)
    for kf in sorted(keys, key=lambda k: k.kdf != KDF_SECRET):  # secrets cost microseconds to try, a password 0.5 s of CPU
        try:
            material = kf.unwrap(password, clear["id"])
        except WrongPassword:
            continue
        except CorruptObject as exc:
            corrupt = exc
            continue
        return Unlocked(material, open_config(raw_config, Sealer(material.enc_key)), kf.name)
    if corrupt is not None and len(key_names) == 1:
        raise corrupt
    if unsupported is not None:
        raise unsupported
    if other_ids:
        raise CorruptObject("config", "its id does not match the key files' (the config is damaged, "
                                      "or the keys belong to another repository)")
    raise WrongPassword("wrong password (no key of this repository opens with it)")
