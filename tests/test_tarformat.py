"""tar headers encoded by store/tarformat.py, read back by Python's tarfile and by GNU tar."""
import io
import re
import shutil
import subprocess
import tarfile

import pytest
from hypothesis import given, settings, strategies as st

from chunkvault.store import tarformat as T

_KINDS = {T.REGULAR: tarfile.REGTYPE, T.HARD_LINK: tarfile.LNKTYPE, T.SYMLINK: tarfile.SYMTYPE,
          T.CHAR_DEVICE: tarfile.CHRTYPE, T.BLOCK_DEVICE: tarfile.BLKTYPE, T.DIRECTORY: tarfile.DIRTYPE,
          T.FIFO: tarfile.FIFOTYPE}
_segment = st.binary(min_size=1, max_size=70).filter(lambda b: b"/" not in b and b"\x00" not in b
                                                      and b not in (b".", b".."))
names = st.lists(_segment, min_size=1, max_size=4).map(b"/".join)
members = st.fixed_dictionaries({
    "kind": st.sampled_from(list(_KINDS)),
    "name": names,
    "mode": st.integers(0, 0o7777),
    "uid": st.one_of(st.integers(0, 70000), st.integers(0, 2 ** 32)),
    "gid": st.integers(0, 2 ** 32),
    "mtime_ns": st.one_of(st.integers(-2 ** 40, 2 ** 40).map(lambda s: s * 10 ** 9), st.integers(-2 ** 62, 2 ** 62)),
    "link": names,
    "major": st.one_of(st.integers(0, 4095), st.integers(0, 2 ** 31 - 1)),  # as a snapshot holds them
    "minor": st.one_of(st.integers(0, 2 ** 20), st.integers(0, 2 ** 31 - 1)),
    "xattrs": st.dictionaries(st.binary(min_size=1, max_size=20).filter(lambda b: b"\x00" not in b)
                              .map(lambda b: b"user." + b), st.binary(max_size=40), max_size=3),
    "data": st.binary(max_size=1500),
})


def archive(items: list[dict]) -> bytes:
    out = bytearray()
    for m in items:
        data = m["data"] if m["kind"] == T.REGULAR else b""
        link = m["link"] if m["kind"] in (T.SYMLINK, T.HARD_LINK) else b""
        out += T.header(m["kind"], m["name"], mode=m["mode"], uid=m["uid"], gid=m["gid"], size=len(data),
                        mtime_ns=m["mtime_ns"], link=link, major=m["major"], minor=m["minor"], xattrs=m["xattrs"])
        out += data + T.padding(len(data))
    return bytes(out + T.end(len(out)))


def exact_mtime(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 10 ** 9
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.lstrip("-").partition(".")
    return sign * (int(whole) * 10 ** 9 + int(frac.ljust(9, "0")))


@settings(max_examples=200, deadline=None)
@given(st.lists(members, min_size=1, max_size=6))
def test_what_tarfile_reads_back_is_what_was_written(items):
    data = archive(items)
    assert len(data) % T.RECORD == 0
    read = tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape")
    got = read.getmembers()
    assert len(got) == len(items)
    for m, g in zip(items, got):
        assert g.name.encode("utf-8", "surrogateescape") == m["name"]
        assert g.type == _KINDS[m["kind"]]
        assert (g.mode, g.uid, g.gid, exact_mtime(g)) == (m["mode"], m["uid"], m["gid"], m["mtime_ns"])
        if m["kind"] in (T.SYMLINK, T.HARD_LINK):
            assert g.linkname.encode("utf-8", "surrogateescape") == m["link"]
        if m["kind"] in (T.CHAR_DEVICE, T.BLOCK_DEVICE):
            assert (g.devmajor, g.devminor) == (m["major"], m["minor"])
        # names as GNU tar reads them back: "%" and "=" were written as %25 and %3D
        xattrs = {re.sub("%(25|3D)", lambda e: "%" if e[1] == "25" else "=", k[len("SCHILY.xattr."):])
                  .encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
                  for k, v in g.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert xattrs == m["xattrs"]
        if m["kind"] == T.REGULAR:
            assert read.extractfile(g).read() == m["data"]


@settings(max_examples=300)
@given(st.binary(max_size=300), st.binary(max_size=30))
def test_a_pax_record_counts_its_own_length(value, key):
    rec = T.record(b"k" + key.replace(b"=", b""), value)
    length, _, rest = rec.partition(b" ")
    assert int(length) == len(rec) and rec.endswith(b"\n")


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar program")
def test_gnu_tar_lists_exact_times_long_names_and_links(tmp_path):
    long = b"d/" + b"n" * 120
    items = [
        {"kind": T.DIRECTORY, "name": b"d", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": -5_000_000_000,
         "link": b"", "major": 0, "minor": 0, "xattrs": {}, "data": b""},
        {"kind": T.REGULAR, "name": long, "mode": 0o640, "uid": 4_000_000_000, "gid": 7,
         "mtime_ns": 1_700_000_000_123_456_789, "link": b"", "major": 0, "minor": 0, "xattrs": {}, "data": b"x" * 700},
        {"kind": T.SYMLINK, "name": b"d/l", "mode": 0o777, "uid": 0, "gid": 0, "mtime_ns": 0, "link": b"t" * 150,
         "major": 0, "minor": 0, "xattrs": {}, "data": b""},
    ]
    (tmp_path / "a.tar").write_bytes(archive(items))
    listing = subprocess.run(["tar", "-tvf", str(tmp_path / "a.tar"), "--full-time", "--numeric-owner"],
                             capture_output=True, check=True, env={"TZ": "UTC", "LC_ALL": "C"}).stdout.decode()
    lines = listing.splitlines()
    assert lines[0].startswith("drwxr-xr-x 0/0") and "1969-12-31 23:59:55 d/" in lines[0]
    assert lines[1].startswith("-rw-r----- 4000000000/7") and " 700 2023-11-14 22:13:20.123456789 " + "d/" + "n" * 120 in lines[1]
    assert lines[2].endswith("d/l -> " + "t" * 150)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "a.tar"), "-C", str(out)], check=True)
    assert (out / long.decode()).read_bytes() == b"x" * 700


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar program")
def test_device_numbers_past_seven_octal_digits_are_read_back_by_gnu_tar(tmp_path):
    """A device number of 8**7 or more lost its high digits (the field's last byte cut off): a minor
    40,000,000 read back as 5,000,000.  GNU tar and bsdtar read such a number in base 256, as GNU tar writes it."""
    items = [{"kind": T.CHAR_DEVICE, "name": b"c", "mode": 0o600, "uid": 0, "gid": 0, "mtime_ns": 0, "link": b"",
              "major": 3_000_000, "minor": 40_000_000, "xattrs": {}, "data": b""}]
    (tmp_path / "a.tar").write_bytes(archive(items))
    listing = subprocess.run(["tar", "-tvf", str(tmp_path / "a.tar")], capture_output=True, check=True,
                             env={"TZ": "UTC", "LC_ALL": "C"}).stdout.decode()
    assert " 3000000,40000000 " in listing
