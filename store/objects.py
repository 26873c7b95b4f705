"""A repository's raw objects by kind (store/FORMAT.md, "Objects on a remote"): their names, and each one
decoded into plain values, for ``list`` and ``cat`` (debugging a repository, scripts, support).

Pure where it can be: the decoding is the readers' own (``decode_index``, ``fetch_header``, ``KeyFile``,
``open_config``, the lock parser), so what is shown is what every command reads.  The names of snapshots,
index objects, packs, key files and locks are the storage's listing, and key files and locks are not
sealed: none of these needs the key.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Iterable, NamedTuple

from chunkvault.errors import AmbiguousId, MissingObject, NoSuchObject, ObjectNotFound, UsageError
from chunkvault.remotes import Remote

from .blob import KIND_DELTA, KIND_RAW, KIND_ZSTD
from .config import KDF_COST_FIELDS, KeyFile, open_config, peek_config
from .crypto import Sealer
from .indexfile import IndexData
from .locks import read_lock
from .pack import PackEntry
from .repository import OBJECT_ID, pack_id_of
from .unlock import missing_config, read_key_file

#: What ``list`` lists; the first five are names in the storage's listing, which need no key.
LIST_KINDS = ("snapshots", "index", "packs", "keys", "locks", "blobs")
PUBLIC_LIST_KINDS = frozenset(LIST_KINDS[:5])
#: What ``cat`` shows; key files and locks are not sealed, so they need no key.
CAT_KINDS = ("config", "snapshot", "index", "key", "lock", "pack", "blob")
PUBLIC_CAT_KINDS = frozenset({"key", "lock"})
#: A blob's stored kind, by its envelope's kind byte.
BLOB_KIND_NAMES = {KIND_RAW: "raw", KIND_ZSTD: "zstd", KIND_DELTA: "delta"}

_PREFIXES = {"snapshots": "snapshots/", "index": "index/", "packs": "data/", "keys": "keys/", "locks": "locks/"}
_SINGULAR = {"snapshot": "snapshots", "index": "index", "pack": "packs", "key": "keys", "lock": "locks"}


class BlobInfo(NamedTuple):
    """One blob as the index lists it (``list blobs``)."""

    id: str
    kind: str  # raw, zstd or delta: how it is stored (file chunks and manifest pieces look alike)
    pack: str
    offset: int
    length: int  # stored: the envelope's bytes in the pack
    raw_length: int  # the plaintext's
    base: str | None  # a delta's base blob

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


def check_kind(kind: Any, kinds: Iterable[str], command: str) -> str:
    """``kind`` if ``command`` takes it, else a UsageError naming the kinds it takes."""
    kinds = tuple(kinds)
    if isinstance(kind, str) and kind in kinds:
        return kind
    if kind == "masterkey":  # restic has it; here the way to keep the key is the export, sealed by a password
        raise UsageError("the repository's secret is never printed: `key export` writes the key and config to "
                         "keep, sealed under the password")
    raise UsageError(f"unknown type {kind!r}: {command} takes {', '.join(kinds)}")


def object_names(remote: Remote, kind: str) -> list[str]:
    """The names of the objects of one public kind (``LIST_KINDS`` but blobs), sorted: a pack by its id,
    without its folder; objects under ``index/``, ``snapshots/`` or ``data/`` not named as one (a stray file)
    left out, as every reader leaves them out."""
    check_kind(kind, sorted(PUBLIC_LIST_KINDS, key=LIST_KINDS.index), "this listing")
    if kind == "packs":
        return sorted(pid.hex() for o in remote.list("data/") if (pid := pack_id_of(o.key)) is not None)
    names = (o.key.split("/", 1)[1] for o in remote.list(_PREFIXES[kind]))
    if kind in ("index", "snapshots"):
        return sorted(n for n in names if OBJECT_ID.fullmatch(n))
    return sorted(names)


def unique_name(names: Iterable[str], spec: Any, kind: str) -> str:
    """The one name among ``names`` that ``spec`` (a name or a prefix of one, any case) begins; NoSuchObject
    for none, AmbiguousId for several; an empty ``spec`` is a UsageError, never the first object."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"a {kind} is named by its id or a unique prefix of it, not {spec!r}")
    prefix = spec.strip().lower()
    matches = [n for n in names if n.startswith(prefix)]
    if len(matches) > 1 and prefix in matches:
        return prefix
    if not matches:
        raise NoSuchObject(f"no {kind} {spec!r} (`list {_SINGULAR.get(kind, kind + 's')}` names them)")
    if len(matches) > 1:
        raise AmbiguousId(f"{kind} prefix {spec!r} is ambiguous ({len(matches)} matches)")
    return matches[0]


def config_json(remote: Remote, sealer: Sealer) -> dict[str, Any]:
    """The config as stored now, its settings opened; its id, creation and settings (no secret is in it)."""
    try:
        raw = remote.get("config")
    except ObjectNotFound:
        raise missing_config(remote) from None
    clear = peek_config(raw)
    config = open_config(raw, sealer)
    return {"format": clear["format"], "id": config.repo_id, "created": config.created,
            "settings": asdict(config.settings)}


def key_json(remote: Remote, name: str) -> dict[str, Any]:
    """A key file's public fields: its derivation and its cost, when and where it was made, the repository
    it names.  Neither its salt nor its wrapped secret: with them, guessing the password needs no repository."""
    key = f"keys/{name}"
    try:
        kf = KeyFile.decode(name, read_key_file(remote, name))
    except ObjectNotFound:
        raise MissingObject(key) from None
    return {"id": name, "kdf": kf.kdf, **{f: kf.cost[f] for f in KDF_COST_FIELDS[kf.kdf]}, "created": kf.created,
            "host": kf.host, "user": kf.user, "repository": kf.repo}


def lock_json(remote: Remote, name: str) -> dict[str, Any]:
    """A lock object's fields, as every command reads them."""
    lock = read_lock(remote, f"locks/{name}")
    return {"id": name, "kind": lock.kind, "purpose": lock.purpose, "host": lock.host, "pid": lock.pid,
            "time": lock.time, "boot": lock.boot, "start": lock.start, "pidns": lock.pidns}


def public_object(remote: Remote, kind: str, spec: Any) -> dict[str, Any]:
    """``cat key`` or ``cat lock`` of the object ``spec`` names (an id or a unique prefix): read with no key."""
    check_kind(kind, sorted(PUBLIC_CAT_KINDS), "this reading without a key")
    name = unique_name(object_names(remote, _SINGULAR[kind]), spec, kind)
    return key_json(remote, name) if kind == "key" else lock_json(remote, name)


def entry_json(e: PackEntry) -> dict[str, Any]:
    """One entry of a pack header or an index object."""
    return {"id": e.blob_id.hex(), "kind": BLOB_KIND_NAMES.get(e.kind, str(e.kind)), "offset": e.offset,
            "length": e.length, "raw_length": e.raw_length, "base": e.base_id.hex() if e.base_id else None}


def index_json(name: str, index: IndexData) -> dict[str, Any]:
    """An index object: the index objects it supersedes, and each pack's entries."""
    return {"id": name, "supersedes": [s.hex() for s in index.supersedes],
            "packs": [{"id": pack_id.hex(), "blobs": [entry_json(e) for e in entries]}
                      for pack_id, entries in index.packs.items()]}


def pack_json(name: str, size: int, entries: list[PackEntry]) -> dict[str, Any]:
    """A pack's decoded header: its entries, in the order it lists them."""
    return {"id": name, "size": size, "blobs": [entry_json(e) for e in entries]}
