"""The test vectors in store/FORMAT.md decode as the document says."""
import pathlib
import re

import pytest

from chunkvault.errors import CorruptObject
from chunkvault.store.blob import (
    DELTA_BLOCKS, DELTA_DICT, KIND_DELTA, KIND_RAW, KIND_ZSTD, envelope_base, open_blob, open_envelope,
    seal_blob, seal_whole_blobs,
)
from chunkvault.store.crypto import (
    BlobHasher, Sealer, content_name, derive_argon2id, derive_secret_kek, encode_secret, is_secret,
)
from chunkvault.store.indexfile import decode_index
from chunkvault.store.manifest import OP_DELETE, OP_ENTRY, T_DIR, T_FILE, decode_records, decode_records_reference
from chunkvault.store.pack import read_pack
from chunkvault.store.xattrs import decode_xattrs

DOC = pathlib.Path(__file__).resolve().parent.parent / "store" / "FORMAT.md"


@pytest.fixture(scope="module")
def v():
    block = DOC.read_text().split("## Test vectors", 1)[1]
    return {k: bytes.fromhex(h) for k, h in re.findall(r"^(\w+) = ([0-9a-f]*)$", block, re.M)}


def test_blob_ids(v):
    h = BlobHasher(v["id_key"])
    for name in ("raw", "base", "delta", "long_base", "long_delta"):
        assert h(v[f"{name}_plain"]) == v[f"{name}_id"]


def test_envelopes(v):
    s = Sealer(v["enc_key"])
    assert v["raw_envelope"][0] == KIND_RAW and v["base_envelope"][0] == KIND_ZSTD
    assert open_blob(s, v["raw_id"], v["raw_envelope"]) == v["raw_plain"]
    assert open_blob(s, v["base_id"], v["base_envelope"]) == v["base_plain"]
    assert envelope_base(v["delta_envelope"]) == v["base_id"]
    assert open_blob(s, v["delta_id"], v["delta_envelope"], base_plain=v["base_plain"]) == v["delta_plain"]
    # bound to its id: the same bytes under another id do not open
    with pytest.raises(CorruptObject):
        open_blob(s, v["base_id"], v["raw_envelope"])
    # bound to its base id
    forged = bytes([KIND_DELTA]) + v["raw_id"] + v["delta_envelope"][33:]
    with pytest.raises(CorruptObject):
        open_blob(s, v["delta_id"], forged, base_plain=v["raw_plain"])


def test_delta_payload_methods(v):
    s = Sealer(v["enc_key"])
    kind, payload = open_envelope(s, v["delta_id"], v["delta_envelope"])
    assert kind == KIND_DELTA and payload[0] == DELTA_DICT
    kind, payload = open_envelope(s, v["long_delta_id"], v["long_delta_envelope"])
    assert kind == KIND_DELTA and payload[0] == DELTA_BLOCKS
    assert payload[1:5] == (3000).to_bytes(4, "little") and payload[5:6] == b"\x40"
    assert envelope_base(v["long_delta_envelope"]) == v["long_base_id"]
    assert open_blob(s, v["long_delta_id"], v["long_delta_envelope"], 3000, v["long_base_plain"]) == v["long_delta_plain"]
    # blocks 0 and 2 are taken from the base: a base too short to hold them is refused
    with pytest.raises(CorruptObject, match="outside"):
        open_blob(s, v["long_delta_id"], v["long_delta_envelope"], base_plain=v["long_base_plain"][:2047])


def test_a_bare_frame_is_the_first_releases_method_0(v):
    """Delta payloads of the first releases had no method byte: the dictionary frame alone."""
    s = Sealer(v["enc_key"])
    _, payload = open_envelope(s, v["delta_id"], v["delta_envelope"])
    bare = seal_blob(s, v["delta_id"], KIND_DELTA, payload[1:], v["base_id"])
    assert bytes(payload[1:5]) == b"\x28\xb5\x2f\xfd"
    assert open_blob(s, v["delta_id"], bare, base_plain=v["base_plain"]) == v["delta_plain"]
    with pytest.raises(CorruptObject, match="unknown delta method"):
        open_blob(s, v["delta_id"], seal_blob(s, v["delta_id"], KIND_DELTA, b"\x07" + payload[1:], v["base_id"]),
                  base_plain=v["base_plain"])


def test_pack_and_index(v):
    s = Sealer(v["enc_key"])
    assert bytes.fromhex(content_name(v["pack"])) == v["pack_id"]
    entries = read_pack(s, v["pack"], "vector pack")
    assert [e.blob_id for e in entries] == [v["raw_id"], v["base_id"], v["delta_id"]]
    assert entries[2].base_id == v["base_id"] and entries[2].kind == KIND_DELTA
    for e, name in zip(entries, ("raw", "base", "delta")):
        env = v["pack"][e.offset : e.offset + e.length]
        assert env == v[f"{name}_envelope"]
        assert e.raw_length == len(v[f"{name}_plain"])
    idx = decode_index(s, v["index"], "vector index")
    assert list(idx.packs) == [v["pack_id"]] and idx.packs[v["pack_id"]] == entries
    assert idx.supersedes == []


def test_manifest_records(v):
    records, used = decode_records(v["manifest_records"], "vector manifest")
    assert used == len(v["manifest_records"])
    (a, b) = records
    assert a.op == OP_ENTRY and a.path == b"dir/file"
    e = a.entry
    assert (e.type, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.ctime_ns, e.ino, e.dev) == (
        T_FILE, 0o644, 1000, 1000, 1_700_000_000_000_000_000, 4, 1_700_000_000_000_000_001, 42, 7)
    assert e.digest == b"\x11" * 32 and e.chunk_ids() == [v["raw_id"]]
    assert b.op == OP_DELETE and b.path == b"gone" and b.entry is None


def test_extended_attributes_record(v):
    raw = v["xattr_record"]
    assert raw[5 + 3 + 1] & 4  # op, path length, "bin", type: the flags byte says attributes follow
    for decode in (decode_records, decode_records_reference):
        records, used = decode(raw, "vector manifest")
        assert used == len(raw)
        (rec,) = records
        e = rec.entry
        assert (rec.op, rec.path, e.type, e.mode, e.uid, e.ino, e.dev, e.flags) == (OP_ENTRY, b"bin", T_DIR, 0o755,
                                                                                   0, 43, 7, 0)
        assert decode_xattrs(e.xattrs) == {b"security.selinux": b"bin_t", b"user.note": b"kept"}


def test_key_secret(v):
    text = v["secret_text"]
    assert text.startswith(b"cvk1-") and is_secret(text) and encode_secret(bytes(range(32))) == text
    assert derive_secret_kek(text, v["secret_salt"]) == v["secret_kek"]


def test_password_kek(v):
    assert derive_argon2id(b"vector password", v["password_salt"], 2, 64, 2) == v["password_kek"]
    # a second, independent implementation (OpenSSL's, where this cryptography has it) agrees
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    except ImportError:
        return
    other = Argon2id(salt=v["password_salt"], length=32, iterations=2, lanes=2, memory_cost=64)
    assert other.derive(b"vector password") == v["password_kek"]


class _OlderAead:
    """An AEAD binding without ``encrypt_into`` (cryptography before 44)."""

    def __init__(self, aead):
        self.encrypt, self.decrypt = aead.encrypt, aead.decrypt


@pytest.mark.parametrize("in_place", [True, False])
def test_envelopes_open_the_same_whichever_way_they_are_sealed(in_place):
    s = Sealer(bytes(range(32)))
    if not in_place:
        s._aead = _OlderAead(s._aead)
    blob_id, payload = bytes(32), b"payload " * 50
    for kind, base in ((KIND_ZSTD, None), (KIND_RAW, None), (KIND_DELTA, b"\x07" * 32)):
        env = seal_blob(s, blob_id, kind, memoryview(payload), base)
        assert envelope_base(env) == base
        assert open_envelope(s, blob_id, env) == (kind, payload)
        with pytest.raises(CorruptObject):  # the id and base stay bound to the sealed bytes
            open_envelope(s, b"\x01" * 32, env)
    batch = [(bytes([i]) * 32, kind, payload[: 10 * i]) for i, kind in enumerate((KIND_ZSTD, KIND_RAW) * 3)]
    for (blob_id, kind, data), env in zip(batch, seal_whole_blobs(s, batch)):  # sealed in one loop
        assert envelope_base(env) is None
        assert open_envelope(s, blob_id, env) == (kind, data)
    with pytest.raises(ValueError):
        seal_whole_blobs(s, [(blob_id, KIND_DELTA, b"")])


def _in_forked_child(nonces) -> list[bytes]:
    """What ``nonces()`` returns when called in a forked child of this process."""
    import os

    from chunkvault.store.crypto import NONCE_SIZE

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, b"".join(nonces()))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    return [raw[i : i + NONCE_SIZE] for i in range(0, len(raw), NONCE_SIZE)]


def test_nonces_never_repeat_across_threads_batches_or_a_fork():
    import threading

    from chunkvault.store.crypto import NONCE_SIZE

    s = Sealer(bytes(range(32)))

    def nonces() -> list[bytes]:
        out = [s.seal(b"m", b"")[:NONCE_SIZE] for _ in range(100)]
        for n in (1, 250, 0, 7):
            sealed = s.seal_many_after([(b"h", b"m", b"")] * n)
            assert [bytes(x[:1]) for x in sealed] == [b"h"] * n
            out += [bytes(x[1 : 1 + NONCE_SIZE]) for x in sealed]
        return out

    parent_first = nonces()
    child = _in_forked_child(nonces)
    in_threads: list[list[bytes]] = [[], []]
    threads = [threading.Thread(target=lambda out=out: out.extend(nonces())) for out in in_threads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = parent_first + nonces() + child + in_threads[0] + in_threads[1]
    assert len(set(everything)) == len(everything) == 5 * 358


def test_nonces_are_drawn_as_each_seal_is_made_and_never_kept(monkeypatch):
    """A pool of nonces kept in memory came back whole in each process resumed from one memory image (a VM
    snapshot restored twice, a cloned VM), which then sealed different data under the same nonces; the
    kernel reseeds its generator on such a resume, so each seal, or batch of seals, draws its own."""
    from chunkvault.store import crypto

    s = Sealer(bytes(range(32)))
    drawn: list[bytes] = []

    def urandom(n: int) -> bytes:
        drawn.append(bytes([len(drawn) + 1]) * n)
        return drawn[-1]

    monkeypatch.setattr(crypto.os, "urandom", urandom)
    one = s.seal(b"one", b"ad")
    after = s.seal_after(b"h", b"two", b"ad")
    batch = s.seal_many_after([(b"h", b"three", b"ad"), (b"h", b"four", b"ad")])
    monkeypatch.undo()
    assert [len(d) for d in drawn] == [12, 12, 24]
    assert one[:12] == drawn[0] and after[1:13] == drawn[1]
    assert [bytes(x[1:13]) for x in batch] == [drawn[2][:12], drawn[2][12:]]
    assert [s.open(x, b"ad") for x in (one, bytes(after[1:]), *(bytes(x[1:]) for x in batch))] == [
        b"one", b"two", b"three", b"four"]


def test_wal_object(v):
    """The WAL archive object opens under its own name only, and names the blob FORMAT.md says."""
    from chunkvault.store.walarchive import WalFile

    s = Sealer(v["enc_key"])
    w = WalFile.decode(s, "000000010000000000000001", v["wal_object"])
    assert (w.name, w.size, w.blob_ids(), w.host, w.time) == (
        "000000010000000000000001", 4, [v["raw_id"]], "vector", "2023-11-14T22:13:20.000000+00:00")
    with pytest.raises(CorruptObject, match="authentication failed"):
        WalFile.decode(s, "000000010000000000000002", v["wal_object"])
