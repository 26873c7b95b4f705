"""Key material, the password KDFs, generated key secrets and the AEAD every object is sealed with.

The repository's secret is 96 random bytes: an encryption key, a key for blob
ids (keyed BLAKE3) and the chunker's secret.  Keeping the three apart lets a
second repository share only the chunker secret (so `copy` keeps dedup) without
sharing the keys that protect data.
"""
from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass
from typing import Callable

import blake3

try:  # a buffer about to be overwritten need not be zeroed first
    from ._deltamatch import uninitialized as _buffer
except ImportError:
    _buffer = bytearray

NONCE_SIZE = 12
TAG_SIZE = 16
KEY_SIZE = 32


class AuthenticationFailed(Exception):
    """Internal: the AEAD tag did not verify. Callers turn it into a named error."""


@dataclass(frozen=True)
class KeyMaterial:
    enc_key: bytes
    id_key: bytes
    chunker_secret: bytes

    @classmethod
    def generate(cls) -> "KeyMaterial":
        return cls(os.urandom(KEY_SIZE), os.urandom(KEY_SIZE), os.urandom(KEY_SIZE))

    def to_bytes(self) -> bytes:
        return self.enc_key + self.id_key + self.chunker_secret

    @classmethod
    def from_bytes(cls, raw: bytes) -> "KeyMaterial":
        if len(raw) != 3 * KEY_SIZE:
            raise ValueError("key material has the wrong length")
        return cls(raw[:32], raw[32:64], raw[64:])

    def __repr__(self) -> str:  # never print secrets
        return "KeyMaterial(<secret>)"


def _fresh_nonces(n: int) -> list[bytes]:
    """``n`` random nonces drawn from the OS now, for seals made now: never kept for later.  A pool kept in
    memory (it was 256 per thread) came back whole in each process resumed from one memory image, a VM
    snapshot restored twice or a cloned VM, and sealed different data under the same nonces; the kernel
    reseeds its generator on such a resume (vmgenid).  A batch of seals (``seal_many_after``) draws its
    nonces in one call: one per blob kept an initial backup's compressing workers of small files waiting
    for the interpreter lock about a quarter of their time, which ``os.urandom`` releases."""
    raw = os.urandom(NONCE_SIZE * n)
    return [raw[i : i + NONCE_SIZE] for i in range(0, len(raw), NONCE_SIZE)]


class Sealer:
    """AES-256-GCM with a fresh random 96-bit nonce per message.

    Random nonces keep every object independent (a blob can move between packs
    unchanged); the usual bound of 2**32 messages per key (random 96-bit nonces
    keep the chance of a repeat below 2**-32 up to there) counts every seal
    ever made under the key: each blob stored (a repack moves envelopes without
    sealing them again), pack header, index and snapshot object.  At 1 MiB a
    chunk that is some 4 PiB of data stored, far above any repository's.

    cryptography is imported here, at first use, not with the module: its
    6 MB then come after a password's scrypt has freed its 32 MiB instead of
    on top of them, where a command's memory peaks.
    """

    def __init__(self, key: bytes):
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        self._invalid_tag = InvalidTag

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, ad)

    def seal_after(self, head: bytes, plaintext: bytes | memoryview, ad: bytes) -> bytes | bytearray:
        """``head`` then what ``seal`` returns, encrypted straight into one buffer: the concatenations copied
        every sealed byte twice more (an initial backup seals most of what it stores this way)."""
        nonce = os.urandom(NONCE_SIZE)
        encrypt_into = getattr(self._aead, "encrypt_into", None)  # cryptography 44 and later
        if encrypt_into is None:
            return head + nonce + self._aead.encrypt(nonce, plaintext, ad)
        return _sealed_into(encrypt_into, head, nonce, plaintext, ad)

    def seal_many_after(self, messages: list[tuple[bytes, bytes | memoryview, bytes]]) -> list[bytes | bytearray]:
        """``seal_after`` of each (head, plaintext, associated data), in one loop: a backup of small files
        seals tens of thousands of blobs, and the per-call layers around the cipher held the interpreter
        lock about as long as the cipher itself (cryptography's AES-GCM keeps it too)."""
        encrypt_into = getattr(self._aead, "encrypt_into", None)
        if encrypt_into is None:
            return [self.seal_after(head, plaintext, ad) for head, plaintext, ad in messages]
        return [_sealed_into(encrypt_into, head, nonce, plaintext, ad)
                for (head, plaintext, ad), nonce in zip(messages, _fresh_nonces(len(messages)))]

    def open(self, sealed: bytes | memoryview, ad: bytes) -> bytes:
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise AuthenticationFailed("too short")
        sealed = memoryview(sealed)
        try:
            return self._aead.decrypt(bytes(sealed[:NONCE_SIZE]), sealed[NONCE_SIZE:], ad)
        except self._invalid_tag:
            raise AuthenticationFailed("authentication tag mismatch") from None


def _sealed_into(encrypt_into: Callable[..., None], head: bytes, nonce: bytes, plaintext: bytes | memoryview,
                 ad: bytes) -> bytearray:
    """``head``, ``nonce``, then the ciphertext and tag, encrypted into one new buffer."""
    start = len(head) + NONCE_SIZE
    out = _buffer(start + len(plaintext) + TAG_SIZE)
    out[:start] = head + nonce
    encrypt_into(nonce, plaintext, ad, memoryview(out)[start:])
    return out


class BlobHasher:
    """Blob ids: BLAKE3 keyed with the repository's id key, so ids reveal nothing."""

    def __init__(self, id_key: bytes):
        self._key = id_key

    def __call__(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self._key, max_threads=1).digest()


def content_name(data: bytes | memoryview) -> str:
    """Name of an object stored by content (packs, index files, snapshots): unkeyed BLAKE3 of its bytes."""
    return blake3.blake3(data).hexdigest()


# --- password-based key derivation: scrypt (older key files, `.backup` exports) ---

SCRYPT_R = 8
SCRYPT_P = 1
MAX_P = 64  # the most lanes a key file may ask for: bounds what a planted one can make us compute
MAX_R = 32
MIN_LOG_N = 10
MAX_LOG_N = 19  # 512 MiB with r = 8
SCRYPT_MAX_MEMORY = (1 << 31) - 1 - (1 << 20)  # hashlib's scrypt takes a maxmem below 2 GiB


def scrypt_memory(log_n: int, r: int) -> int:
    """Bytes of scrypt's working memory with N = 2**log_n: N blocks of 128 r bytes (p lanes each reuse it)."""
    return 128 * r << log_n


def derive_kek(password: bytes, salt: bytes, log_n: int, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    if not MIN_LOG_N <= log_n <= MAX_LOG_N:
        raise ValueError(f"scrypt cost 2**{log_n} out of range")
    if not (1 <= r <= MAX_R and 1 <= p <= MAX_P):
        raise ValueError(f"scrypt r={r} p={p} out of range")
    n = 1 << log_n
    need = 128 * r * (n + p + 2)  # what OpenSSL's scrypt allocates: N blocks of 128 r bytes, and p more
    if need > SCRYPT_MAX_MEMORY:
        raise ValueError(f"scrypt r={r} with N=2**{log_n} needs {need >> 20} MiB, more than it can be given")
    import hashlib  # here: OpenSSL's hashlib costs 5 ms at every command, and only older key files use scrypt

    try:
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=need + (1 << 20), dklen=KEY_SIZE)
    except ValueError as exc:  # OpenSSL's words alone ("malloc failure") named no limit
        if "malloc failure" not in str(exc):
            raise
        from chunkvault.errors import memory_refused

        raise memory_refused(f" for the password's key derivation (scrypt, {need >> 20} MiB)") from exc


# --- generated key secrets (no stretching needed) -------------------------------

SECRET_PREFIX = b"cvk1-"
SECRET_RANDOM = 32
_SECRET_CHECK = 4
_SECRET_CONTEXT = "chunkvault key secret v1"


def _secret_check(raw: bytes) -> bytes:
    return blake3.blake3(raw, derive_key_context=_SECRET_CONTEXT + " check").digest(_SECRET_CHECK)


def new_secret() -> bytes:
    """A generated key secret: 256 random bits and a checksum, as ASCII text.

    A password needs a memory-hard derivation because people choose guessable
    ones; 256 random bits cannot be guessed, so a key file for a secret wraps
    the key under a plain keyed hash, and opening a repository costs
    microseconds, not half a second of CPU and 32 MiB.  The checksum keeps a
    typed or truncated string from passing for a secret (it is then an
    ordinary password).
    """
    return encode_secret(os.urandom(SECRET_RANDOM))


def encode_secret(raw: bytes) -> bytes:
    """The text form of a secret's random part: prefix, lowercase base32 of it and its checksum."""
    return SECRET_PREFIX + base64.b32encode(raw + _secret_check(raw)).rstrip(b"=").lower()


def _secret_random(password: bytes) -> bytes | None:
    """The random part of a generated secret, or None when ``password`` is not one."""
    if not password.startswith(SECRET_PREFIX):
        return None
    body = password[len(SECRET_PREFIX):].upper()
    try:
        raw = base64.b32decode(body + b"=" * (-len(body) % 8))
    except ValueError:
        return None
    if len(raw) != SECRET_RANDOM + _SECRET_CHECK or _secret_check(raw[:SECRET_RANDOM]) != raw[SECRET_RANDOM:]:
        return None
    return raw[:SECRET_RANDOM]


def is_secret(password: bytes) -> bool:
    """Whether ``password`` is a secret ``new_secret`` made (format and checksum)."""
    return _secret_random(password) is not None


_BOM = b"\xef\xbb\xbf"  # what an editor may put before a file's text (UTF-8's byte order mark)


def _trimmed(password: bytes) -> bytes:
    """``password`` without the blanks around it, nor a byte order mark before it."""
    return password.strip().removeprefix(_BOM).strip()


def as_secret(password: bytes) -> bytes:
    """``password``, or the secret it is once copied with surrounding blanks, in capitals, or saved by an
    editor that put a byte order mark before it (a secret has none of them, so no password is taken for
    another)."""
    trimmed = _trimmed(password)
    if trimmed[:len(SECRET_PREFIX)].lower() == SECRET_PREFIX:
        trimmed = SECRET_PREFIX + trimmed[len(SECRET_PREFIX):]
        if not is_secret(password) and is_secret(trimmed):
            return trimmed
    return password


def looks_like_secret(password: bytes) -> bool:
    """A ``cvk1-`` string whose checksum fails: a generated secret mistyped or cut short, most likely."""
    trimmed = _trimmed(password)
    return trimmed[:len(SECRET_PREFIX)].lower() == SECRET_PREFIX and not is_secret(as_secret(trimmed))


def derive_secret_kek(secret: bytes, salt: bytes) -> bytes:
    """The key-encryption key of a generated secret: BLAKE3 in key-derivation mode, no stretching."""
    raw = _secret_random(secret)
    if raw is None:
        raise ValueError("not a generated key secret")
    return blake3.blake3(salt + raw, derive_key_context=_SECRET_CONTEXT).digest(KEY_SIZE)


MEMORY_LOG_N = 15  # 128 * r * 2**15 = 32 MiB, restic's bound too: the peak memory of opening a repository


def _lane_seconds(log_n: int, samples: int = 3, lanes: int = 2) -> float:
    """Seconds a lane of 2**log_n adds to a derivation, measured, not extrapolated (large N runs slower
    than small N suggests): the median of ``samples`` derivations of ``lanes`` lanes, per lane.  One
    derivation of one lane, which also faulted in the memory, made tuned keys 15-50 % cheaper than the
    target and varied from run to run."""
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        derive_kek(b"tune", b"0" * 16, log_n, SCRYPT_R, lanes)
        times.append(time.perf_counter() - start)
    return sorted(times)[samples // 2] / lanes


def tune_scrypt(target_seconds: float, max_p: int = MAX_P) -> tuple[int, int]:
    """(log2 N, p) so that a derivation takes about ``target_seconds`` here.

    N grows first, up to 32 MiB of memory (restic's bound as well); beyond
    that the time comes from p, lanes computed one after another, which cost
    time but no more memory, so opening a repository does not set a
    command's peak memory.  Only a target beyond ``max_p`` lanes (what the
    format's readers accept) grows N further.
    """
    log_n = MIN_LOG_N
    start = time.perf_counter()
    derive_kek(b"tune", b"0" * 16, log_n)
    elapsed = max(time.perf_counter() - start, 1e-6)
    while log_n < MEMORY_LOG_N and elapsed * 2 <= target_seconds:
        log_n += 1
        elapsed *= 2
    if log_n < MEMORY_LOG_N or elapsed * 2 > target_seconds:
        return log_n, 1
    elapsed = _lane_seconds(log_n)
    while log_n < MAX_LOG_N and elapsed * max_p < target_seconds:
        log_n += 1
        elapsed *= 2
    return log_n, max(1, min(max_p, round(target_seconds / elapsed)))


# --- password-based key derivation: Argon2id (new key files) ---------------------

ARGON2_LANES = 2  # computed in parallel: on two cores a derivation takes half its CPU time
ARGON2_MEMORY_KIB = 32 << 10  # scrypt's bound (and restic's): the peak memory of opening a repository
ARGON2_LEAST_KIB = 1 << 10  # what a target below one pass over 32 MiB, or of 0, gets
#: The memory a key file may ask for: twice what ``tune_argon2id`` ever gives, room for a later default.  Every
#: key file is tried with a mistyped password: one planted asking for 4 GiB made that cost 4 GiB.
ARGON2_MAX_MEMORY_KIB = 2 * ARGON2_MEMORY_KIB
ARGON2_MAX_WORK_KIB = 1 << 26  # passes x memory a key file may ask for (about a minute of CPU): the tuner's cap
#: The most passes a key file may ask for: the tuner's cap, at 32 MiB (it makes more than one pass over no less).
#: A pass costs more than its memory: each starts its lanes' threads, so 4 million passes over 16 KiB, within
#: ``ARGON2_MAX_WORK_KIB``, took half an hour.
ARGON2_MAX_PASSES = ARGON2_MAX_WORK_KIB // ARGON2_MEMORY_KIB


def derive_argon2id(password: bytes, salt: bytes, t: int, m_kib: int, p: int) -> bytes:
    """Argon2id (version 0x13) of ``password``: ``t`` passes over ``m_kib`` KiB in ``p`` lanes.

    The bounds keep a planted key file from making opening compute for hours.
    """
    if not (1 <= p <= MAX_P and 8 * p <= m_kib <= ARGON2_MAX_MEMORY_KIB and 1 <= t <= ARGON2_MAX_PASSES
            and t * m_kib <= ARGON2_MAX_WORK_KIB):
        raise ValueError(f"argon2id t={t} m={m_kib} KiB p={p} out of range")
    from argon2.exceptions import HashingError
    from argon2.low_level import Type, hash_secret_raw  # the reference code: lanes run in threads

    try:
        return hash_secret_raw(password, salt, time_cost=t, memory_cost=m_kib, parallelism=p,
                               hash_len=KEY_SIZE, type=Type.ID)
    except HashingError as exc:  # the library's words alone ("Memory allocation error") named no limit
        from chunkvault.errors import memory_refused, threads_refused

        if "memory" in str(exc).lower():
            raise memory_refused(f" for the password's key derivation (Argon2id, {m_kib >> 10} MiB)") from exc
        if "thread" in str(exc).lower():
            raise threads_refused(f"the password's key derivation's {p} threads") from exc
        raise


def _argon2_seconds(t: int, m_kib: int, samples: int) -> float:
    """CPU seconds (every lane's thread counted) of a derivation here: the least of ``samples``, since what
    disturbs a measurement (other load, page faults the host is slow to serve) only ever adds."""
    times = []
    for _ in range(samples):
        start = time.process_time()
        derive_argon2id(b"tune", b"0" * 16, t, m_kib, ARGON2_LANES)
        times.append(time.process_time() - start)
    return max(min(times), 1e-6)


def tune_argon2id(target_seconds: float) -> tuple[int, int, int]:
    """(t, m KiB, p) so that a derivation costs about ``target_seconds`` of CPU here.

    The CPU time is what a guess costs an attacker; the lanes run in parallel,
    so on two cores opening waits about half of it.  The memory is 32 MiB
    unless one pass over it costs more than the target; the time comes from
    passes, which cost no memory.  They are measured at the full memory, not
    extrapolated from a smaller one, where one disturbed millisecond decided
    the memory.  The passes are extrapolated from two, then corrected by
    derivations at the estimate: short ones spend a larger share faulting in
    the memory and starting threads (extrapolated alone, keys came out 30 %
    cheaper).  A target of 0 (tests) measures nothing.
    """
    if target_seconds <= 0:
        return 1, ARGON2_LEAST_KIB, ARGON2_LANES
    derive_argon2id(b"tune", b"0" * 16, 1, 8 * ARGON2_LANES, ARGON2_LANES)  # untimed: loads the library
    m = ARGON2_MEMORY_KIB
    one_pass = _argon2_seconds(1, m, 2)
    while m > ARGON2_LEAST_KIB and one_pass > target_seconds:
        m //= 2
        one_pass /= 2
    if m < ARGON2_MEMORY_KIB:
        return 1, m, ARGON2_LANES
    most = ARGON2_MAX_WORK_KIB // m
    t = max(1, min(round(target_seconds / (_argon2_seconds(2, m, 3) / 2)), most))
    t = max(1, min(round(t * target_seconds / _argon2_seconds(t, m, 2)), most))
    return t, m, ARGON2_LANES
