"""Any byte string given to a decoder yields a value or chunkvault's own error."""
import os

from hypothesis import given, settings, strategies as st

from chunkvault.errors import ChunkvaultError
from chunkvault.store.blob import open_blob
from chunkvault.store.config import KeyFile, peek_config
from chunkvault.store.crypto import Sealer
from chunkvault.store.indexfile import decode_index
from chunkvault.store.manifest import decode_records, iter_records
from chunkvault.store.pack import PackBuilder, read_pack
from chunkvault.store.snapshot import Snapshot

SEALER = Sealer(bytes(32))
BLOB_ID = bytes(32)


def only_our_errors(fn, *args):
    try:
        fn(*args)
    except ChunkvaultError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_manifest_decoder(data):
    only_our_errors(decode_records, data, "m")
    only_our_errors(lambda: list(iter_records([data[:7], data[7:]], "m")))


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_sealed_decoders(data):
    only_our_errors(open_blob, SEALER, BLOB_ID, data)
    only_our_errors(read_pack, SEALER, data, "p")
    only_our_errors(decode_index, SEALER, data, "i")
    only_our_errors(Snapshot.decode, SEALER, "s", data)
    only_our_errors(peek_config, data)
    only_our_errors(KeyFile.decode, "k", data)


@settings(max_examples=200)
@given(st.integers(0, 10_000), st.integers(0, 255), st.integers(1, 40))
def test_mutated_pack(pos, xor, cut):
    b = PackBuilder()
    b.add(BLOB_ID, 0, os.urandom(50), 10)
    good = b.finish(SEALER)
    bad = bytearray(good)
    bad[pos % len(bad)] ^= xor or 1
    only_our_errors(read_pack, SEALER, bytes(bad), "p")
    only_our_errors(read_pack, SEALER, good[:-cut], "p")
