"""Self-contained ``.backup`` files: one snapshot, resolved, encrypted under an export password.

An export carries a snapshot's complete tree (a differential's chain is
resolved, so the file is a full snapshot on its own) and every distinct chunk
it needs, once, in a single stream of sealed sections (store/FORMAT.md,
"Export file").  Nothing in it is a repository id: chunks are referenced by
their position in the file, and an import re-derives every blob id from the
plaintext with the destination's keyed hash, so a destination trusts nothing
but the file's authentication.

Every section is sealed with AES-256-GCM under a key derived from the export
password (scrypt), and its associated data binds the file's random id, the
section's type and its number among sections of that type; the end section
seals the counts and a BLAKE3 hash of every byte before it.  So truncation,
reordering, splicing in another file's sections or a flipped bit anywhere is
detected.  Readers authenticate the whole file first and only then write:
``import_backup`` stores nothing, and ``restore_from_file`` creates nothing,
for a file that does not verify.

Memory stays bounded for huge snapshots: the writer keeps a compact map of
chunks already written (~60 bytes per distinct chunk) and a few batches in
flight; a reader keeps 16 bytes per chunk (where each one is in the file, and
its length, which every file record's size is checked against), and an import
32 more (the chunk's id in the destination) and, where the snapshot has a
parent there, 33 (its delta base, and whether a file was met that refers to it).
"""
from __future__ import annotations

import fcntl
import hmac
import json
import re
import os
import stat
import struct
import threading
import time
from array import array
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import blake3
import zstandard

from chunkvault.chunker import ChunkerParams
from chunkvault.localfiles import abandoned, fsync_directory
from chunkvault.errors import (ChunkvaultError, CorruptObject, MissingObject, NewerObject, UnsupportedFormat,
                               UsageError, WrongPassword, output_error)

from .backup import (BATCH_BYTES, BATCH_CHUNKS, DELTA_BATCH_BYTES, FUTURE_SLACK, DeltaPolicy, series,
                     usable_parent)
from .blob import KIND_ZSTD, compress
from .blobindex import BlobIndex
from .config import check_kdf_seconds
from .chronology import HEALS
from .copy import COPIED_FROM, IMPORTED_FROM, origins
from .crypto import (MAX_LOG_N, MIN_LOG_N, NONCE_SIZE, SCRYPT_R, TAG_SIZE, AuthenticationFailed, Sealer,
                     derive_kek, scrypt_memory, tune_scrypt)
from .locks import IMPORT, SHARED, RepoLock
from .manifest import (OP_ENTRY, T_DIR, T_FILE, T_HARDLINK, ManifestStats, Record, RecordStream, encode_record,
                       unread)
from .manifest_io import ManifestWriter
from .owners import OWNERS_KEY, OwnerMap, chain_owners
from .repository import WORKERS, Repo, pack_key
from .confinement import Confinement
from .restore import Restorer, RestoreOptions, RestoreResult, lookup_by_scan, refuse_overlap
from .snapshot import KIND_FULL, Snapshot, now_iso

__all__ = [
    "ExportStats", "ExportInfo", "ExportFile", "ExportWriter", "export", "import_backup", "restore_from_file",
    "blob_ref", "ref_ordinal",
]

MAGIC = b"CVBACKUP"
VERSION = 2  # 2: records may carry extended attributes; 1 is read too
# Written for a snapshot whose chain holds no extended attributes: a chunkvault from before them reads it.
VERSION_WITHOUT_XATTRS = 1
HEADER = struct.Struct("<8sHH16sBBBB16s16s16s")  # magic version flags file_id kdf log_n r p salt check sum
HEADER_SIZE = HEADER.size  # 80
KDF_SCRYPT = 1
SECTION_HEAD = struct.Struct("<BI")  # type, sealed length

S_META = 1
S_BLOB = 2
S_RECORDS = 3
S_END = 4
SECTION_NAMES = {S_META: "metadata", S_BLOB: "blob", S_RECORDS: "records", S_END: "end"}
END = struct.Struct("<QQQ32s")  # sections before it, blobs, records, BLAKE3 of every byte before it
_REF = struct.Struct("<4Q")  # a chunk reference in an exported record: the blob's ordinal, then zeros

ENC_RAW = 0
ENC_ZSTD = 1

SECTION_AD = b"chunkvault export v1"
ENC_KEY_CONTEXT = b"chunkvault export v1 encryption"
CHECK_CONTEXT = b"chunkvault export v1 password check"

#: Largest sealed section a reader accepts (a chunk is at most 64 MiB).
MAX_SECTION = (64 << 20) + 4096
#: The record stream is cut into pieces of this many bytes.
RECORD_PIECE = 1 << 20
MAX_SCRYPT_R = 16
MAX_SCRYPT_P = 16
#: The most scrypt memory (128 r N bytes) and work (p times that) a header may ask for: what ``export`` writes
#: at most (r 8; N grows past 32 MiB only when 16 lanes over 32 MiB fall short of the longest --kdf-time, up to
#: log_n 19), and so what files it wrote before need.  The header checksum is no secret: anyone can forge a
#: header, and a reader derives before it can tell a wrong password from a forged cost.
MAX_EXPORT_MEMORY = scrypt_memory(MAX_LOG_N, SCRYPT_R)  # 512 MiB
MAX_EXPORT_WORK = MAX_SCRYPT_P * MAX_EXPORT_MEMORY  # 8 GiB


# --- pure format helpers --------------------------------------------------------------


def blob_ref(ordinal: int) -> bytes:
    """The 32-byte chunk reference a record in an export carries: the blob's ordinal, zero-padded."""
    return ordinal.to_bytes(8, "little") + bytes(24)


def ref_ordinal(ref: bytes) -> int:
    return int.from_bytes(ref[:8], "little")


def section_ad(file_id: bytes, stype: int, index: int) -> bytes:
    """Binds a section to its file, its type and its number among sections of that type."""
    return SECTION_AD + file_id + struct.pack("<BQ", stype, index)


def derive_keys(password: bytes, salt: bytes, log_n: int, r: int, p: int) -> tuple[bytes, bytes]:
    """(encryption key, 16-byte password check) from the export password."""
    master = derive_kek(password, salt, log_n, r, p)
    enc_key = blake3.blake3(ENC_KEY_CONTEXT, key=master).digest()
    check = blake3.blake3(CHECK_CONTEXT, key=master).digest()[:16]
    return enc_key, check


def scrypt_cost_problem(log_n: int, r: int, p: int) -> str | None:
    """Why a header's scrypt parameters are refused (out of range, or asking for more than ``export``
    writes), or None: checked before deriving, since a forged header makes a reader pay what it asks."""
    if not (MIN_LOG_N <= log_n <= MAX_LOG_N and 1 <= r <= MAX_SCRYPT_R and 1 <= p <= MAX_SCRYPT_P):
        return f"scrypt parameters out of range (log_n {log_n}, r {r}, p {p})"
    memory = scrypt_memory(log_n, r)
    if memory > MAX_EXPORT_MEMORY or p * memory > MAX_EXPORT_WORK:
        return (f"its header asks for scrypt log_n {log_n}, r {r}, p {p} ({memory >> 20} MiB, {p} lane(s)), more "
                f"than chunkvault writes (at most {MAX_EXPORT_MEMORY >> 20} MiB and "
                f"{MAX_EXPORT_WORK >> 30} GiB over all lanes): not derived")
    return None


def encode_header(file_id: bytes, log_n: int, r: int, p: int, salt: bytes, check: bytes,
                  version: int = VERSION) -> bytes:
    body = HEADER.pack(MAGIC, version, 0, file_id, KDF_SCRYPT, log_n, r, p, salt, check, bytes(16))[:-16]
    return body + blake3.blake3(body).digest()[:16]


@dataclass(frozen=True)
class Header:
    file_id: bytes
    log_n: int
    r: int
    p: int
    salt: bytes
    check: bytes


def _header_checks(data: bytes, version: int) -> bool:
    """Whether the header's checksum holds with ``version`` in its version field."""
    body = data[:8] + struct.pack("<H", version) + data[10 : HEADER_SIZE - 16]
    return blake3.blake3(body).digest()[:16] == data[HEADER_SIZE - 16 : HEADER_SIZE]


def decode_header(data: bytes, what: str) -> Header:
    """The clear header; UnsupportedFormat for a foreign or newer file, CorruptObject for damage."""
    if not data:
        raise UnsupportedFormat(f"{what} is empty, not a chunkvault export (.backup) file")
    if len(data) < 10 and MAGIC.startswith(data[:8]):
        raise CorruptObject(what, "truncated inside the header")
    if len(data) < 10 or data[:8] != MAGIC:
        raise UnsupportedFormat(f"{what} is not a chunkvault export (.backup) file")
    (version,) = struct.unpack_from("<H", data, 8)
    if not 1 <= version <= VERSION:
        if len(data) >= HEADER_SIZE and any(_header_checks(data, v) for v in range(1, VERSION + 1)):
            raise CorruptObject(what, f"header damaged: its version field reads {version}, but the header checks "
                                "out as this format's")
        if version > VERSION:
            raise UnsupportedFormat(f"{what} was written by a newer chunkvault (export format {version}), or its "
                                    "header is damaged")
        raise UnsupportedFormat(f"{what} has an unknown export format version {version}")
    if len(data) < HEADER_SIZE:
        raise CorruptObject(what, "truncated inside the header")
    _, _, flags, file_id, kdf, log_n, r, p, salt, check, checksum = HEADER.unpack_from(data)
    if not _header_checks(data, version):
        raise CorruptObject(what, "header checksum mismatch (the header is damaged)")
    if flags != 0 or kdf != KDF_SCRYPT:  # the header checks out: a newer writer's choices
        raise UnsupportedFormat(f"{what} names export flags {flags} or key derivation {kdf}, which a newer "
                                "chunkvault writes: upgrade")
    problem = scrypt_cost_problem(log_n, r, p)
    if problem is not None:
        raise CorruptObject(what, problem)
    return Header(file_id, log_n, r, p, salt, check)


def encode_payload(data: bytes | memoryview, level: int) -> bytes:
    kind, payload = compress(data, level)
    return bytes((ENC_ZSTD if kind == KIND_ZSTD else ENC_RAW,)) + payload


_local = threading.local()


def payload_length(plain: bytes, what: str) -> int:
    """The length of the bytes a section's payload holds, without decoding it (a zstd frame records its
    content size, which decoding holds it to): what a blob is known to hold from the first pass on."""
    if not plain or plain[0] not in (ENC_RAW, ENC_ZSTD):
        raise CorruptObject(what, "unknown payload encoding")
    if plain[0] == ENC_RAW:
        return len(plain) - 1
    try:
        size = zstandard.frame_content_size(memoryview(plain)[1:])
    except zstandard.ZstdError as exc:
        raise CorruptObject(what, f"bad compressed payload: {exc}") from None
    if size < 0 or size > MAX_SECTION:
        raise CorruptObject(what, "compressed payload without a valid size")
    return size


def decode_payload(plain: bytes, what: str) -> bytes:
    """A blob's or record piece's bytes from its section plaintext (raw, or one zstd frame)."""
    payload_length(plain, what)
    if plain[0] == ENC_RAW:
        return plain[1:]
    body = memoryview(plain)[1:]
    try:
        d = getattr(_local, "decompressor", None)
        if d is None:
            d = _local.decompressor = zstandard.ZstdDecompressor()
        return d.decompress(body)
    except zstandard.ZstdError as exc:
        raise CorruptObject(what, f"bad compressed payload: {exc}") from None


class _RecordCursor:
    """Decodes the record stream piece by piece and checks what a resolved tree must be.

    ``blob_sizes``: the length of each blob (by number), as far as the file has been read.  A file's recorded
    size must be what its chunks hold: with any other, every restore of the file fails.
    """

    def __init__(self, what: str, blob_sizes: array[int]):
        self.what = what
        self.blob_sizes = blob_sizes
        self.stream = RecordStream(what)
        self.confinement = Confinement()
        self.count = 0
        self.leaf: bytes | None = None  # the newest entry that is no directory, its key and separator
        self.link_targets: set[bytes] = set()  # what hard links name (``ExportFile.verify`` looks them up)

    def decode(self, piece: bytes, where: str) -> list[Record]:
        """The records ``piece`` ends, unchecked (a record spanning many sections is gathered in one buffer:
        joined anew to each, it was copied once a section)."""
        return self.stream.feed(piece, f"{self.what} {where}")

    def feed(self, piece: bytes, blobs_before: int, where: str) -> list[Record]:
        records = self.decode(piece, where)
        for rec in records:
            self._check(rec, blobs_before, where)
        self.count += len(records)
        return records

    def _check(self, rec: Record, blobs_before: int, where: str) -> None:
        if rec.op != OP_ENTRY or rec.entry is None:
            raise CorruptObject(self.what, f"{where}: a record other than an entry")
        try:
            self.confinement.check(rec)
        except ValueError as exc:
            raise CorruptObject(self.what, f"{where}: {exc}") from None
        e = rec.entry
        # What a tree read from a directory cannot hold, and an import would store unseen: its restore fails
        if self.leaf is not None and rec.key.startswith(self.leaf):
            raise CorruptObject(self.what, f"{where}: {rec.path!r} lies below an entry that is not a directory")
        if e.type != T_DIR:
            self.leaf = rec.key + b"\x00"
        if e.chunks and e.type != T_FILE:
            raise CorruptObject(self.what, f"{where}: {rec.path!r} is no file and refers to chunks")
        if len(e.digest) not in (0, 32):  # BLAKE3's, or none
            raise CorruptObject(self.what, f"{where}: {rec.path!r} has a digest of {len(e.digest)} bytes")
        if e.type == T_HARDLINK:
            self.link_targets.add(e.target)
        held = 0
        for n, x, y, z in _REF.iter_unpack(e.chunks):
            if n >= blobs_before or x or y or z:
                raise CorruptObject(self.what, f"{where}: {rec.path!r} refers to a chunk not stored before it")
            held += self.blob_sizes[n]
        if e.type == T_FILE and not unread(e) and held != e.size:
            raise CorruptObject(self.what, f"{where}: {rec.path!r} records a size of {e.size} bytes, and its "
                                           f"chunks hold {held}")

    def finish(self) -> None:
        self.stream.finish("the record stream ends inside a record")


# --- writing ----------------------------------------------------------------------------


class ExportWriter:
    """Writes sections to a binary stream: the metadata, then blobs and record pieces, then the end.

    Callers add each blob before any record that refers to it (by the ref
    ``add_blob`` returns).  Knows nothing of repositories.
    """

    def __init__(self, out: BinaryIO, password: bytes, metadata: dict[str, Any], *, log_n: int,
                 r: int = 8, p: int = 1, level: int = 3, version: int = VERSION):
        if not password:
            raise UsageError("an empty export password is not allowed")
        problem = scrypt_cost_problem(log_n, r, p)
        if problem is not None:  # a file its readers would refuse (a long --kdf-time once wrote one)
            raise ValueError(problem)
        self.out = out
        self.level = level
        self.version = version
        self.file_id = os.urandom(16)
        salt = os.urandom(16)
        enc_key, check = derive_keys(password, salt, log_n, r, p)
        self.sealer = Sealer(enc_key)
        self.hasher = blake3.blake3()
        self.counts = {S_META: 0, S_BLOB: 0, S_RECORDS: 0, S_END: 0}
        self.bytes_written = 0
        self.records = 0
        self._records = bytearray()
        self._emit(encode_header(self.file_id, log_n, r, p, salt, check, version))
        self.write_section(S_META, json.dumps(metadata, sort_keys=True, ensure_ascii=True).encode())

    def _emit(self, data: bytes) -> None:
        self.out.write(data)
        self.hasher.update(data)
        self.bytes_written += len(data)

    def write_section(self, stype: int, plaintext: bytes) -> None:
        index = self.counts[stype]
        sealed = self.sealer.seal(plaintext, section_ad(self.file_id, stype, index))
        self.counts[stype] = index + 1
        self._emit(SECTION_HEAD.pack(stype, len(sealed)))
        self._emit(sealed)

    def add_encoded_blob(self, payload: bytes) -> bytes:
        """Store one blob already encoded by ``encode_payload``; returns its ref."""
        ordinal = self.counts[S_BLOB]
        self.write_section(S_BLOB, payload)
        return blob_ref(ordinal)

    def add_blob(self, data: bytes) -> bytes:
        return self.add_encoded_blob(encode_payload(data, self.level))

    def add_record(self, rec: Record) -> None:
        if self.version < 2 and rec.entry is not None and rec.entry.xattrs:
            raise ValueError(f"export format {self.version} holds no extended attributes: {rec.path!r} has some")
        self._records += encode_record(rec)
        self.records += 1
        while len(self._records) >= RECORD_PIECE:
            self._flush_records(RECORD_PIECE)

    def _flush_records(self, n: int) -> None:
        piece = bytes(self._records[:n])
        del self._records[:n]
        self.write_section(S_RECORDS, encode_payload(piece, self.level))

    def finish(self) -> None:
        if self._records:
            self._flush_records(len(self._records))
        sections = sum(self.counts.values())
        end = END.pack(sections, self.counts[S_BLOB], self.records, self.hasher.digest())
        self.write_section(S_END, end)


@dataclass
class ExportStats:
    path: str
    snapshot_id: str
    file_id: str
    files: int = 0
    dirs: int = 0
    bytes: int = 0  # size of the tree's files
    records: int = 0
    blobs: int = 0  # distinct chunks written
    blob_bytes: int = 0  # their plaintext
    file_bytes: int = 0  # size of the .backup file
    duration: float = 0.0


def snapshot_metadata(repo: Repo, snap: Snapshot, chain: list[Snapshot]) -> dict[str, Any]:
    """The export's description of ``snap`` (the last of ``chain``): its owners' names are its whole
    chain's, as the tree the file holds is."""
    stats = {**snap.stats, OWNERS_KEY: chain_owners(s.stats for s in chain)}
    return {
        "snapshot": {"id": snap.id, "time": snap.time, "kind": snap.kind, "parent": snap.parent, "host": snap.host,
                     "paths": list(snap.paths), "tags": list(snap.tags), "stdin_name": snap.stdin_name,
                     "stats": stats, "chain_length": len(chain)},
        "source": {"repository": repo.config.repo_id, "chunker": repo.chunker_params.to_dict()},
        "exported": now_iso(),
    }


def _encode_batch(repo: Repo, ids: list[bytes], level: int) -> list[tuple[bytes, int]]:
    return [(encode_payload(data, level), len(data)) for data in repo.read_blobs(ids)]


def export(repo: Repo, snapshot: Snapshot, out_path: str, password: bytes, *, kdf_seconds: float = 0.5,
           kdf_log_n: int | None = None, overwrite: bool = False,
           checkpoint: Callable[[], None] = lambda: None) -> ExportStats:
    """Write ``snapshot``'s resolved tree and every chunk it needs into one ``.backup`` file.

    Written under a temporary name and renamed when complete: a failed export
    leaves no partial file.  ``checkpoint`` is called between batches of chunks: it may raise to stop.
    """
    started = time.monotonic()
    if not password:
        raise UsageError("an empty export password is not allowed")
    check_kdf_seconds(kdf_seconds)
    if out_path == "-":
        raise UsageError("an export is written to a file, not to standard output: give a file name "
                         "(NAME.backup)").hinting(" with --output")
    out_path = os.path.abspath(out_path)
    if os.path.lexists(out_path) and not stat.S_ISREG(os.lstat(out_path).st_mode):
        # written beside it, then renamed over it: a symlink (/dev/stdout), a pipe or a device would be replaced
        raise UsageError(f"{out_path} is not a regular file: an export is written to a new or regular file")
    if os.path.lexists(out_path) and not overwrite:
        raise UsageError(f"{out_path} exists (remove it, or ask to overwrite it: --force, overwrite=True in the API)")
    directory, base = os.path.split(out_path)
    if not os.path.isdir(directory):
        raise UsageError(f"no directory {directory} for the export file")
    snapshots = repo.snapshots()
    chain = repo.chain_of(snapshot, snapshots)
    records = repo.tree(snapshot, snapshots)
    log_n, p = (kdf_log_n, 1) if kdf_log_n is not None else tune_scrypt(kdf_seconds, max_p=MAX_SCRYPT_P)
    level = repo.config.settings.compression_level
    stats = ExportStats(out_path, snapshot.id, "")
    _remove_abandoned(directory, base)
    tmp = os.path.join(directory, _temp_prefix(base) + os.urandom(6).hex())
    replacing = os.path.lexists(out_path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise output_error(f"creating the export file in {directory}", exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while written: see _remove_abandoned
    except OSError:
        pass  # a file system without locks (NFS mounted nolock): no cleanup can take a file it cannot lock
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            w = ExportWriter(f, password, snapshot_metadata(repo, snapshot, chain), log_n=log_n, p=p,
                             level=level, version=export_version(chain))
            stats.file_id = w.file_id.hex()
            _write_tree(repo, w, records, level, stats, checkpoint)
            w.finish()
            f.flush()
            os.fsync(f.fileno())
        _put_in_place(tmp, out_path, overwrite)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        left = "the file it was to replace is left as it was" if replacing else "no export file was left"
        if isinstance(exc, OSError):
            raise output_error(f"writing the export {out_path} ({left})", exc) from None
        if isinstance(exc, CorruptObject) and not isinstance(exc, NewerObject):  # it named a blob or a pack only
            raise exc.explained(f"; snapshot {snapshot.short_id} cannot be exported whole: `check --read-data` "
                                f"names the files it takes down, `repair` the way back ({left})") from None
        raise
    try:
        fsync_directory(directory)
    except OSError as exc:
        raise output_error(f"flushing the directory of the export {out_path}", exc) from None
    stats.file_bytes = w.bytes_written
    stats.records = w.records
    stats.blobs = w.counts[S_BLOB]
    stats.duration = round(time.monotonic() - started, 3)
    return stats


def export_version(chain: list[Snapshot]) -> int:
    """The export format a file of ``chain``'s tree is written in: 1 unless a snapshot of the chain is of
    version 2 (its records may carry extended attributes), as a repository stays at format 1 without them; a
    chunkvault from before extended attributes refused every file of version 2, theirs or not."""
    return VERSION if any(s.version > 1 for s in chain) else VERSION_WITHOUT_XATTRS


def _put_in_place(tmp: str, out_path: str, overwrite: bool) -> None:
    """Rename the written file to its name; without ``overwrite``, only where that name is still free: another
    export to it that ended meanwhile (two runs of one job) was replaced, though neither was asked to."""
    if overwrite:
        os.replace(tmp, out_path)
        return
    try:
        os.link(tmp, out_path)  # fails where the name was taken meanwhile, as a rename cannot
    except FileExistsError:
        raise UsageError(f"{out_path} exists: it was written while this export ran (another export to that "
                         "name?), and is left as it is (remove it, or ask to overwrite it: --force)") from None
    except OSError:  # a file system without hard links (FAT, some FUSE file systems): as close as a rename gets
        if os.path.lexists(out_path):
            raise UsageError(f"{out_path} exists: it was written while this export ran, and is left as it "
                             "is (remove it, or ask to overwrite it: --force)") from None
        os.replace(tmp, out_path)
        return
    os.unlink(tmp)


NAME_MAX = 255  # bytes of a file name (Linux's file systems)


def _temp_prefix(base: str) -> str:
    """The hidden name an export to ``base`` is written under, less its random tail: from a name too long
    to take the prefix and tail (any name the file system takes is a name to export to), a hash of it."""
    raw = os.fsencode(base)
    stem = base if len(raw) <= NAME_MAX - len(".") - len(".tmp-") - 12 else blake3.blake3(raw).hexdigest()[:32]
    return f".{stem}.tmp-"


def _remove_abandoned(directory: str, base: str) -> None:
    """Remove the temporary files of exports to ``base`` whose writer died (SIGKILL, a power cut), which
    would otherwise stay hidden beside the output, as large as the export got. A writer holds a lock on its
    file until it renames it; one not written for a minute whose lock is free has no writer left."""
    pattern = re.compile(re.escape(_temp_prefix(base)) + "[0-9a-f]{12}")
    try:
        names = [n for n in os.listdir(directory) if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and abandoned(fd):
                os.unlink(path)
        except OSError:  # it went meanwhile
            continue
        finally:
            os.close(fd)


def _write_tree(repo: Repo, w: ExportWriter, records: Iterator[Record], level: int, stats: ExportStats,
                checkpoint: Callable[[], None], batch_bytes: int = 8 << 20, window: int = 4) -> None:
    """Chunks are read and compressed a few batches ahead; each record is written after its chunks."""
    seen = BlobIndex()
    counts = ManifestStats()
    index = repo.index
    inflight: deque[tuple[Future[list[tuple[bytes, int]]], list[Record]]] = deque()
    batch: list[bytes] = []
    batch_records: list[Record] = []
    size = 0
    ordinal = 0

    def drain_one() -> None:
        checkpoint()
        fut, recs = inflight.popleft()
        for payload, raw in fut.result():
            w.add_encoded_blob(payload)
            stats.blob_bytes += raw
        for r in recs:
            w.add_record(r)

    def submit() -> None:
        """Send the batch, with the records whose chunks it completes; at most ``window`` stay in flight."""
        nonlocal batch, batch_records, size
        inflight.append((pool.submit(_encode_batch, repo, batch, level), batch_records))
        batch, batch_records, size = [], [], 0
        while len(inflight) > window:
            drain_one()

    with ThreadPoolExecutor(min(WORKERS, 2)) as pool:
        try:
            for rec in records:
                e = rec.entry
                assert e is not None
                counts.count(rec)
                if e.chunks:
                    refs = bytearray()  # not a list of them: 73 bytes more a chunk, for a file of millions
                    for cid in e.chunk_ids():
                        loc = seen.get(cid)
                        if loc is None:
                            seen.add(cid, 0, ordinal, 0, 0)
                            refs += blob_ref(ordinal)
                            ordinal += 1
                            batch.append(cid)
                            il = index.get(cid)
                            size += il.raw_length if il is not None else repo.chunker_params.avg_size
                            if size >= batch_bytes:  # a large file's chunks go a batch at a time, not all at once
                                submit()
                        else:
                            refs += blob_ref(loc.offset)
                    rec = Record(rec.op, rec.path, replace(e, chunks=bytes(refs)))
                batch_records.append(rec)
                if size >= batch_bytes or len(batch_records) >= 4096:
                    submit()
            inflight.append((pool.submit(_encode_batch, repo, batch, level), batch_records))
            while inflight:
                drain_one()
        finally:
            for fut, _ in inflight:
                fut.cancel()
    stats.files, stats.dirs, stats.bytes = counts.files, counts.dirs, counts.bytes


# --- reading ----------------------------------------------------------------------------


@dataclass
class ExportInfo:
    """What an export file holds, known once it has been verified."""

    file_id: str
    snapshot: Snapshot  # as it was in the source repository (its id there; ``kind`` before resolving)
    exported: str
    source_repository: str
    chunker: ChunkerParams
    sections: int = 0
    blobs: int = 0
    records: int = 0
    file_bytes: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


def _parse_metadata(plain: bytes, what: str, file_id: bytes) -> ExportInfo:
    try:
        meta = json.loads(plain)
        s = meta["snapshot"]
        snap = Snapshot(time=s["time"], kind=s["kind"], parent=s["parent"], host=s["host"], paths=s["paths"],
                        tags=s["tags"], manifest=[], stats=s["stats"], stdin_name=s["stdin_name"], id=s["id"])
        snap.check_fields()  # before anything is imported: a repository lists, sorts and prints it
        if not re.fullmatch(r"[0-9a-f]{64}", s["id"]):  # kept as the import's origin (what copies match by)
            raise ValueError(f"snapshot id {s['id'][:80]!r} is not 64 hex digits")
        chunker = ChunkerParams.from_dict(meta["source"]["chunker"])
        return ExportInfo(file_id.hex(), snap, str(meta["exported"]), str(meta["source"]["repository"]), chunker,
                          metadata=meta)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CorruptObject(what, f"metadata section is malformed ({type(exc).__name__}: {exc})") from None


class ExportFile:
    """An open ``.backup`` file: header checked and key derived on opening; ``verify`` authenticates it whole.

    After ``verify`` it serves blobs by ref (random access, each section
    authenticated again as it is read) and its records, so a restore reads
    straight from it.
    """

    def __init__(self, path: str, password: bytes, checkpoint: Callable[[], None] = lambda: None):
        self.path = path
        self.what = f"export file {path}"
        self._checkpoint = checkpoint  # called before each section ``sections`` reads: it may raise to stop
        try:  # without waiting: a FIFO no one writes to held the open until Ctrl-C, before the check below
            self._f = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb", buffering=0)
        except FileNotFoundError:
            if path == "-":  # import-tar's and key import's way to name standard input
                raise UsageError("a .backup file is read at random and twice (to authenticate it, then to restore), "
                                 "not from standard input: save it to a file first") from None
            raise UsageError(f"no file {path}") from None
        except IsADirectoryError:
            raise UsageError(f"{path} is a directory, not a .backup file") from None
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        try:
            st = os.fstat(self._f.fileno())
            if not stat.S_ISREG(st.st_mode):  # a pipe: the file is read twice, and at random
                raise UsageError(f"{path} is not a regular file: a .backup file is read at random and twice "
                                 "(to authenticate it, then to restore); save it to a file first")
            self.size = st.st_size
            self.header = decode_header(os.pread(self._f.fileno(), HEADER_SIZE, 0), self.what)
            enc_key, check = derive_keys(password, self.header.salt, self.header.log_n, self.header.r,
                                         self.header.p)
            if not hmac.compare_digest(check, self.header.check):
                raise WrongPassword(f"wrong export password for {path}")
            self.sealer = Sealer(enc_key)
        except BaseException:
            self._f.close()
            raise
        self.info: ExportInfo | None = None
        self._blob_offsets = array("Q")
        self._blob_lengths = array("I")
        self.blob_sizes = array("I")  # each blob's plaintext length, known once verified
        self._record_sections: list[tuple[int, int, int]] = []  # (offset of sealed bytes, length, blobs before)

    # -- sequential pass --

    def _open_section(self, stype: int, index: int, sealed: bytes | memoryview, offset: int) -> bytes:
        try:
            return self.sealer.open(sealed, section_ad(self.header.file_id, stype, index))
        except AuthenticationFailed:
            raise CorruptObject(self.what, f"{SECTION_NAMES[stype]} section {index} at byte {offset}: "
                                           "authentication failed (damaged, changed, or moved)") from None

    def sections(self) -> Iterator[tuple[int, int, int, bytes]]:
        """(type, index among its type, offset, plaintext) of every section in order, the end one checked.

        Raises CorruptObject for any truncation, damage, reordering or extra bytes.
        """
        fd = self._f.fileno()
        f = os.fdopen(os.dup(fd), "rb", buffering=1 << 20)
        try:
            f.seek(0)
            hasher = blake3.blake3()
            hasher.update(f.read(HEADER_SIZE))
            pos = HEADER_SIZE
            counts = {S_META: 0, S_BLOB: 0, S_RECORDS: 0, S_END: 0}
            total = 0
            while True:
                self._checkpoint()
                head = f.read(SECTION_HEAD.size)
                if len(head) < SECTION_HEAD.size:
                    raise CorruptObject(self.what, f"truncated: the file ends at byte {pos + len(head)}, "
                                                   f"after {total} sections, without its end section")
                stype, length = SECTION_HEAD.unpack(head)
                if stype not in SECTION_NAMES:
                    raise CorruptObject(self.what, f"section {total} at byte {pos}: unknown section type {stype}")
                index = counts[stype]
                name = f"{SECTION_NAMES[stype]} section {index} at byte {pos}"
                if length < NONCE_SIZE + TAG_SIZE or length > MAX_SECTION:
                    raise CorruptObject(self.what, f"{name}: impossible length {length}")
                if pos + SECTION_HEAD.size + length > self.size:
                    raise CorruptObject(self.what, f"truncated: {name} runs past the end of the file")
                if (total == 0) != (stype == S_META):
                    raise CorruptObject(self.what, f"{name}: the metadata section must come first, and only there")
                sealed = f.read(length)
                if len(sealed) != length:
                    raise CorruptObject(self.what, f"truncated: {name} runs past the end of the file")
                plain = self._open_section(stype, index, sealed, pos)
                if stype == S_END:
                    self._check_end(plain, hasher.digest(), total, counts, name)
                    if f.read(1):
                        raise CorruptObject(self.what, f"unexpected bytes after the end section (byte {pos + 5 + length})")
                    yield stype, index, pos, plain
                    return
                hasher.update(head)
                hasher.update(sealed)
                counts[stype] = index + 1
                total += 1
                yield stype, index, pos, plain
                pos += SECTION_HEAD.size + length
        finally:
            f.close()

    def _check_end(self, plain: bytes, digest: bytes, total: int, counts: dict[int, int], name: str) -> None:
        if len(plain) != END.size:
            raise CorruptObject(self.what, f"{name}: malformed")
        sections, blobs, _records, file_hash = END.unpack(plain)
        if not hmac.compare_digest(file_hash, digest):
            raise CorruptObject(self.what, f"{name}: the file's bytes do not match its hash")
        if sections != total or blobs != counts[S_BLOB]:
            raise CorruptObject(self.what, f"{name}: counts do not match the file ({sections} sections, "
                                           f"{blobs} blobs recorded; {total}, {counts[S_BLOB]} found)")

    def verify(self) -> ExportInfo:
        """Authenticate every section and the end, check the records; remember where the blobs are."""
        offsets = array("Q")  # compact: 16 bytes per blob, even for millions of chunks
        lengths = array("I")
        sizes = array("I")
        record_sections: list[tuple[int, int, int]] = []
        cursor = _RecordCursor(self.what, sizes)
        info: ExportInfo | None = None
        end: bytes = b""
        for stype, index, pos, plain in self.sections():
            if stype == S_META:
                info = _parse_metadata(plain, self.what, self.header.file_id)
            elif stype == S_BLOB:
                offsets.append(pos)
                lengths.append(len(plain) + NONCE_SIZE + TAG_SIZE)
                sizes.append(payload_length(plain, f"{self.what} blob section {index} at byte {pos}"))
            elif stype == S_RECORDS:
                where = f"records section {index} at byte {pos}"
                record_sections.append((pos, len(plain) + NONCE_SIZE + TAG_SIZE, len(offsets)))
                cursor.feed(decode_payload(plain, f"{self.what} {where}"), len(offsets), where)
            else:
                end = plain
        cursor.finish()
        assert info is not None
        sections, blobs, records, _ = END.unpack(end)
        if records != cursor.count:
            raise CorruptObject(self.what, f"end section: {records} records recorded, {cursor.count} found")
        if cursor.count == 0:
            raise CorruptObject(self.what, "the file holds no records (not even the snapshot's root)")
        info.sections, info.blobs, info.records, info.file_bytes = sections + 1, blobs, records, self.size
        self._blob_offsets = offsets
        self._blob_lengths = lengths
        self.blob_sizes = sizes
        self._record_sections = record_sections
        self.info = info
        if cursor.link_targets:
            self._check_link_targets(cursor.link_targets)
        return info

    def _check_link_targets(self, targets: set[bytes]) -> None:
        """Each hard link names a file before it (its first path, which holds the data), read in a second
        pass over the records alone: a link to nothing or to a later path made its restore fail."""
        found: set[bytes] = set()
        for rec in self.records():
            e = rec.entry
            assert e is not None
            if e.type == T_FILE and rec.path in targets:
                found.add(rec.path)
            elif e.type == T_HARDLINK and e.target not in found:
                raise CorruptObject(self.what, f"hard link {rec.path!r} names {e.target!r}, which is no file "
                                               "before it")

    # -- random access, after verify --

    def _read_sealed(self, offset: int, length: int, stype: int, index: int) -> bytes:
        data = os.pread(self._f.fileno(), SECTION_HEAD.size + length, offset)
        if len(data) != SECTION_HEAD.size + length or SECTION_HEAD.unpack_from(data) != (stype, length):
            raise CorruptObject(self.what, f"{SECTION_NAMES[stype]} section {index} at byte {offset}: "
                                           "changed since the file was verified")
        return self._open_section(stype, index, memoryview(data)[SECTION_HEAD.size:], offset)

    def read_blob(self, blob_id: bytes) -> bytes:
        """The plaintext of the chunk a record refers to by ``blob_id`` (a ref, see ``blob_ref``)."""
        n = ref_ordinal(blob_id)
        if self.info is None or n >= len(self._blob_offsets):
            raise CorruptObject(self.what, f"no blob {n} in the file")
        offset = self._blob_offsets[n]
        plain = self._read_sealed(offset, self._blob_lengths[n], S_BLOB, n)
        return decode_payload(plain, f"{self.what} blob section {n} at byte {offset}")

    def read_blobs(self, blob_ids: list[bytes]) -> list[bytes]:
        return [self.read_blob(b) for b in blob_ids]

    def records(self, *, checked: bool = True) -> Iterator[Record]:
        """The snapshot's tree (ENTRY records whose chunks are refs into this file).  ``checked``: False
        leaves out the checks of each record ``verify`` made (each piece is still authenticated again as it
        is read), for a reader that only looks the records up.  The checkpoint is called before each piece."""
        if self.info is None:
            raise ValueError("verify() the export file first")
        cursor = _RecordCursor(self.what, self.blob_sizes)
        for i, (offset, length, blobs_before) in enumerate(self._record_sections):
            self._checkpoint()
            where = f"records section {i} at byte {offset}"
            piece = decode_payload(self._read_sealed(offset, length, S_RECORDS, i), f"{self.what} {where}")
            if checked:
                yield from cursor.feed(piece, blobs_before, where)
                continue
            yield from cursor.decode(piece, where)
        cursor.finish()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ExportFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_export(path: str, password: bytes, checkpoint: Callable[[], None] = lambda: None) -> ExportFile:
    """Open and verify a ``.backup`` file (the whole file is authenticated before this returns).
    ``checkpoint``: called before each section the file's ``sections`` gives (see ``ExportFile``)."""
    ef = ExportFile(path, password, checkpoint)
    try:
        ef.verify()
    except BaseException:
        ef.close()
        raise
    return ef


# --- import and restore ------------------------------------------------------------------


@dataclass
class ImportResult:
    snapshot: Snapshot  # when ``skipped``, the one the repository had
    exported_id: str  # the snapshot's id in the repository it was exported from
    skipped: bool = False
    incomplete: list[Snapshot] = field(default_factory=list)  # the copies here that no longer held all of it
    warnings: list[str] = field(default_factory=list)  # delta bases found damaged: those chunks stored whole

    @property
    def heals(self) -> Snapshot | None:
        """The newest of ``incomplete``: the import is ordered after it (``chronology.HEALS``)."""
        return self.incomplete[-1] if self.incomplete else None


def already_here(snapshots: Iterable[Snapshot], exported: Snapshot) -> list[Snapshot]:
    """The repository's copies of the snapshot an export brings, oldest first: the exported one itself (this
    is the repository it came from), or those imported or copied from it before.  Another copy would take a
    retention slot and be the next backup's parent, for nothing."""
    known = origins(exported)
    return [s for s in snapshots if not known.isdisjoint(origins(s))]


def holds_whole(repo: Repo, snap: Snapshot, exported: Snapshot, snapshots: list[Snapshot]) -> bool:
    """Whether the repository's copy of an exported snapshot still holds all of it: as many files,
    directories and bytes, and no rewrite or repair of its own since (which may have dropped directories
    alone), and its chain's manifests and every chunk they name indexed.  One that does not is imported
    again: the export is what heals it.  One whose pack the index lists but that is gone is MissingObject:
    an import would deduplicate against that index (`repair index` first)."""
    if any(snap.stats.get(k) != exported.stats.get(k) for k in ("files", "dirs", "bytes")):
        return False
    if any(snap.stats.get(k) and not exported.stats.get(k) for k in ("rewritten", "repaired")):
        return False
    stored = set(repo.stored_packs())

    def indexed(refs: bytes) -> bool:
        for i in range(0, len(refs), 32):
            loc = repo.locate(refs[i : i + 32])
            if loc is None:
                return False
            if repo.pack_ids[loc.pack_no] not in stored:
                raise MissingObject(pack_key(repo.pack_ids[loc.pack_no]), "pack is missing, and the index lists "
                                    "it: `repair index` first, then import again")
        return True

    try:
        chain = repo.chain_of(snap, snapshots)
    except ChunkvaultError:
        return False
    if not indexed(b"".join(bytes.fromhex(h) for s in chain for h in s.manifest)):
        return False
    pieces = repo.manifest_chunk_refs(chain)
    while True:
        try:
            piece = next(pieces, None)
        except ChunkvaultError:  # a manifest that does not decode
            return False
        if piece is None:
            return True
        if not indexed(piece[1]):
            return False


def import_backup(repo: Repo, path: str, password: bytes, *, lock_wait: float = 0.0,
                  checkpoint: Callable[[], None] = lambda: None, delta: bool = True,
                  no_delta: list[str] | None = None, fixed_chunks: list[str] | None = None) -> ImportResult:
    """Bring an export into ``repo`` as a new full snapshot; chunks it already has are not stored again,
    and a snapshot it already has whole (``already_here``, ``holds_whole``) is not imported again.

    The file is verified whole before anything is stored; then a second pass
    stores its chunks under ids re-derived with this repository's key and
    writes the manifest and the snapshot, last.  A new chunk is stored as a delta where a backup of the
    same tree would store it so (``backup.DeltaPolicy``): against the parent a backup of the snapshot's
    host and paths (or stream name) at its time finds here, with the same options (``delta``,
    ``no_delta``, ``fixed_chunks``: globs of the paths the backups cut at fixed offsets, whose chains are
    deeper).  ``checkpoint`` is called before each section of both passes (and of the records read again
    to find the delta bases): it may raise to stop, before the snapshot is saved.
    """
    started = time.monotonic()
    with open_export(path, password, checkpoint) as ef:
        info = ef.info
        assert info is not None
        _refuse_future(info.snapshot, ef.what)
        # Alone among imports (as copies are): two imports of one file at once each found it absent, and
        # both stored it.
        with RepoLock(repo.remote, SHARED, IMPORT, wait=lock_wait, wait_option=True, alone=True) as repo_lock:
            repo.fresh_index()
            snapshots = repo.snapshots()
            copies = already_here(snapshots, info.snapshot)
            whole = next((c for c in copies if holds_whole(repo, c, info.snapshot, snapshots)), None)
            if whole is not None:
                return ImportResult(whole, info.snapshot.id, skipped=True)
            present = copies[-1] if copies else None  # the newest of those that lost data: this comes after it
            src = info.snapshot
            deltas = DeltaPolicy(repo, delta=delta, no_delta=list(no_delta or []),
                                 fixed_chunks=list(fixed_chunks or []), lost=repo.withhold_unreadable_deltas())
            damaged: set[bytes] = set()  # manifest blobs of a chain passed over that do not read
            bases = _blob_bases(ef, deltas, snapshots, src, damaged) if delta else None
            dest = bytearray(32 * info.blobs)
            dest_view = memoryview(dest)
            counts = ManifestStats()
            warnings: list[str] = []

            def store_batch(writer: Any, batch: list[tuple[int, int, bytes]]) -> None:
                new = []
                for index, pos, plain in batch:
                    data = decode_payload(plain, f"{ef.what} blob section {index} at byte {pos}")
                    if len(data) != ef.blob_sizes[index]:  # the records were checked against that length
                        raise CorruptObject(ef.what, f"blob section {index} at byte {pos}: changed since the file "
                                                     "was verified")
                    did = repo.blob_id(data)
                    dest[32 * index : 32 * index + 32] = did
                    if writer.claim(did):
                        base = bytes(bases[32 * index : 32 * index + 32]) if bases is not None else NO_BASE
                        new.append((did, data, deltas.usable(did, None if base == NO_BASE else base)))
                if new:
                    deltas.store(writer, new, None, warnings)

            with repo.writer() as writer, ThreadPoolExecutor(WORKERS) as pool:
                writer.guard = repo_lock.confirm
                # A manifest the search for a parent found damaged: the same records make the same blob
                writer.damaged = damaged
                writer.damaged_packs = {loc.pack_no: b for b in damaged if (loc := repo.locate(b)) is not None}
                mw = ManifestWriter(repo, writer)
                cursor = _RecordCursor(ef.what, ef.blob_sizes)
                inflight: deque[Future[None]] = deque()
                blobs_seen = 0
                batch: list[tuple[int, int, bytes]] = []
                batch_bytes = 0
                batch_limit = BATCH_BYTES

                def send() -> None:
                    nonlocal batch, batch_bytes, batch_limit
                    if batch:
                        inflight.append(pool.submit(store_batch, writer, batch))
                        batch, batch_bytes, batch_limit = [], 0, BATCH_BYTES
                    while len(inflight) > WORKERS + 1:
                        inflight.popleft().result()

                try:
                    for stype, index, pos, plain in ef.sections():
                        if stype == S_BLOB:
                            blobs_seen += 1
                            batch.append((index, pos, plain))
                            batch_bytes += ef.blob_sizes[index]
                            if bases is not None and bases[32 * index : 32 * index + 32] != NO_BASE:
                                batch_limit = DELTA_BATCH_BYTES  # its bases are read together
                            if batch_bytes >= batch_limit or len(batch) >= BATCH_CHUNKS:
                                send()
                        elif stype == S_RECORDS:
                            send()
                            while inflight:
                                inflight.popleft().result()
                            where = f"records section {index} at byte {pos}"
                            piece = decode_payload(plain, f"{ef.what} {where}")
                            for rec in cursor.feed(piece, blobs_seen, where):
                                e = rec.entry
                                assert e is not None
                                if e.chunks:  # into one buffer: a list of the ids took 100 bytes a chunk
                                    ids = bytearray()
                                    for n, _, _, _ in _REF.iter_unpack(e.chunks):
                                        ids += dest_view[32 * n : 32 * n + 32]
                                    rec = Record(rec.op, rec.path, replace(e, chunks=bytes(ids)))
                                counts.count(rec)
                                mw.add(rec)
                    send()
                    while inflight:
                        inflight.popleft().result()
                    cursor.finish()
                finally:
                    for fut in inflight:
                        fut.cancel()
                manifest = mw.finish()
                writer.flush()  # everything the snapshot references is stored before it
            snap = Snapshot(
                time=src.time, kind=KIND_FULL, parent=None, host=src.host, paths=list(src.paths),
                tags=list(src.tags), manifest=[i.hex() for i in manifest], manifest_starts=mw.starts,
                version=mw.version, stdin_name=src.stdin_name,
                stats={
                    "files": counts.files, "dirs": counts.dirs, "bytes": counts.bytes,
                    "added_blobs": writer.new_blobs - mw.new_blobs,
                    "added_raw_bytes": writer.new_raw_bytes - mw.new_raw_bytes,
                    "added_stored_bytes": writer.stored_bytes - mw.stored_bytes,
                    "delta_blobs": writer.delta_blobs, "delta_stored_bytes": writer.delta_bytes,
                    "whole_stored_bytes": writer.stored_bytes - writer.delta_bytes - mw.stored_bytes,
                    "manifest_bytes": mw.stored_bytes, "manifest_records": mw.records, "chain_length": 1,
                    "unreadable": _unreadable(src, counts.unreadable), "warnings": len(warnings),
                    "duration": round(time.monotonic() - started, 3),
                    # the first origin, kept through every hop as copy keeps it: A copied to B, exported and
                    # imported into C, then A copied to C, sent A's snapshot to C again
                    IMPORTED_FROM: src.stats.get(COPIED_FROM) or src.stats.get(IMPORTED_FROM) or src.id,
                    "imported_file": info.file_id,
                    # the copy here that lost data: of one time, this is the later (``chronology.built_on``)
                    **({HEALS: present.id} if present is not None else {}),
                    # what the next backup of its paths on the same host compares by
                    **{k: src.stats[k] for k in ("xattrs", "started_ns", "finished_ns", OWNERS_KEY)
                       if k in src.stats},
                },
            )
            # a prune that took its lock for stale may have deleted what this import reuses
            return ImportResult(repo.save_snapshot_held(snap, repo_lock), src.id, incomplete=copies,
                                warnings=warnings)


NO_BASE = bytes(32)  # in ``_blob_bases``: the blob has no delta base


def _blob_bases(ef: ExportFile, deltas: DeltaPolicy, snapshots: list[Snapshot], src: Snapshot,
                damaged: set[bytes]) -> bytearray | None:
    """Each blob's delta base, 32 bytes a blob by number (``NO_BASE`` for none), or None when there is no
    parent: as a backup of the snapshot's tree would choose it, at the place of the file that first refers
    to the blob (where a backup first meets the chunk, and so stores it), against the parent a backup of
    its host and paths at its time finds (``backup.series``, ``usable_parent``).  The records are read
    again, in step with the parent's tree (both in manifest order); no more than that array and a byte a
    blob is held.  Whether a blob is new here is known once it is read: its base is only used then."""
    same = series(snapshots, src.host, list(src.paths), src.stdin_name, src.datetime)
    deltas.sequence = len(same)  # the import's number in its series: whose turn it is to restart
    parent, tree = usable_parent(deltas.repo, same, snapshots, damaged) if same else (None, iter(()))
    if parent is None:
        return None
    sizes = ef.blob_sizes
    bases = bytearray(32 * len(sizes))
    met = bytearray(len(sizes))
    prev = next(tree, None)
    prev_key = prev.key if prev is not None else b""
    for rec in ef.records(checked=False):  # checked by ``verify``, and each piece authenticated again
        e = rec.entry
        if e is None or not e.chunks:
            continue
        key = rec.key
        while prev is not None and prev_key < key:
            prev = next(tree, None)
            prev_key = prev.key if prev is not None else b""
        was = prev.entry if prev is not None and prev_key == key else None
        # The parent's content (its digest): the chunks are the parent's, cut alike (the same chunker, as
        # for deduplication at all), so none is new
        unchanged = was is not None and bool(e.digest) and was.digest == e.digest and was.size == e.size
        file_bases = None if unchanged else deltas.file_bases(rec.path, was)
        pos = bi = 0
        for n, _, _, _ in _REF.iter_unpack(e.chunks):
            size = sizes[n]
            if not met[n]:
                met[n] = 1
                if file_bases:
                    base, bi = deltas.base_at(file_bases, bi, pos, size)
                    if base is not None:
                        bases[32 * n : 32 * n + 32] = base
            pos += size
    return bases


def _unreadable(src: Snapshot, flagged: list[bytes]) -> list[str]:
    """The exported snapshot's list of paths its backup could not read, and the entries flagged so: the list
    alone names a file or link kept with an earlier backup's data by a backup that flagged only those
    without data."""
    listed = src.stats.get("unreadable")
    paths = [p for p in listed if isinstance(p, str)] if isinstance(listed, list) else []
    seen = set(paths)
    return paths + [name for p in flagged if (name := os.fsdecode(p) or ".") not in seen]


def _refuse_future(snap: Snapshot, what: str) -> None:
    """CorruptObject for an exported snapshot dated further ahead of this machine's clock than a backup's
    given time may be: imported, it would stay the newest snapshot, the parent of every later backup and
    what ``latest`` restores, until that date came."""
    now = datetime.now(timezone.utc)
    if snap.datetime > now + FUTURE_SLACK:
        raise CorruptObject(what, f"its snapshot is dated {snap.time}, more than "
                                  f"{int(FUTURE_SLACK.total_seconds()) // 60} minutes ahead of this machine's "
                                  f"clock ({now.isoformat(timespec='seconds')}): nothing was imported")


def restore_from_file(path: str, password: bytes, target: str, *, includes: list[str] | None = None,
                      excludes: list[str] | None = None, force: bool = False, delete: bool = False,
                      progress: Callable[[int, int], None] | None = None, numeric_owner: bool = False,
                      iexcludes: list[str] | None = None, overwrite: str = "always", xattrs: bool = True,
                      target_wait: float = 0.0) -> tuple[ExportInfo, RestoreResult]:
    """Restore an export's snapshot straight from the file, no repository involved (``overwrite``: as
    ``Repository.restore``'s, but for ``if-changed``, which compares chunks by a repository's ids; ``xattrs``:
    False sets no extended attributes; ``target_wait``: as ``Repository.restore``'s).

    The file is verified whole first: a damaged or truncated file is refused
    before the target is created or touched.  Every file's digest is checked
    as it is written, as in any restore.  Owners as in a restore from a
    repository: by the recorded names where known here, unless ``numeric_owner``.
    """
    refuse_overlap(target, delete, [(path, "the .backup file")])
    with open_export(path, password) as ef:
        info = ef.info
        assert info is not None
        opts = RestoreOptions(includes=list(includes or []), excludes=list(excludes or []),
                              iexcludes=list(iexcludes or []), force=force or overwrite == "never",
                              delete=delete, overwrite=overwrite, progress=progress, xattrs=xattrs, wait=target_wait,
                              owner_map=None if numeric_owner else OwnerMap.for_names([info.snapshot.stats]))
        with Restorer(ef, target, opts, lookup=lookup_by_scan(ef.records)) as restorer:
            if delete and os.path.isdir(target):
                restorer.delete_extra(ef.records())
            return info, restorer.run(ef.records())
