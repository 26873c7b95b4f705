"""The repository's config object and its password-wrapped key files.

``config`` is JSON: the format version and repository id in clear (so a newer
format is reported before any password is asked), the settings sealed under
the repository key with the version and id as associated data.
``keys/<name>`` wraps the key material under a key derived from a password
(Argon2id; scrypt in older key files) or from a generated key secret (a
keyed hash: 256 random bits need no stretching); any one password or secret
opens the repository.
"""
from __future__ import annotations

import base64
import getpass
import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from chunkvault.errors import CorruptObject, NewerObject, UnsupportedFormat, UsageError, WrongPassword

from .crypto import (
    ARGON2_MAX_MEMORY_KIB, ARGON2_MAX_PASSES, ARGON2_MAX_WORK_KIB, MAX_LOG_N, MAX_P, MAX_R, MIN_LOG_N, SCRYPT_P,
    SCRYPT_R, AuthenticationFailed, KeyMaterial, Sealer, content_name, derive_argon2id, derive_kek, as_secret,
    derive_secret_kek, is_secret, scrypt_memory, tune_argon2id,
)

FORMAT_VERSION = 2
#: The format of a repository that holds (or held) a WAL archive.  A chunkvault before ``wal/`` objects knows
#: only format 1, and its prune, seeing no snapshot name their data, would delete the archive: the first WAL
#: file stored raises the config to this, so that it refuses the repository instead.  Every other repository
#: stays format 1, which every chunkvault reads.
FORMAT_WAL = 2
#: The format of a repository that holds (or held) a snapshot of version 2 (extended attributes in its
#: manifest).  A chunkvault before them knows only format 1 and leaves such a snapshot out as unreadable: its
#: forget removed the snapshot's parent without rebasing it, and it advised forgetting the snapshot itself.
#: Every chunkvault that knows format 2 reads these snapshots, so the first one stored raises the config to it.
FORMAT_XATTRS = 2
CONFIG_AD = b"chunkvault config v1"
KEY_AD = b"chunkvault key v1"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: Any, what: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (ValueError, TypeError):
        raise CorruptObject(what, "bad base64 field") from None


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested past the parser's depth: not ours either
        raise CorruptObject(what, "not valid JSON") from None
    if not isinstance(obj, dict):
        raise CorruptObject(what, "not a JSON object")
    return obj


@dataclass
class Settings:
    """Repository-wide settings, fixed at init (chunker) or changeable later (the rest)."""

    chunker: dict[str, int]
    compression_level: int = 3
    pack_size: int = 16 << 20
    #: ``--type auto``: a new full after this many differentials in a chain ...
    full_every: int = 23
    #: ... or when the chain's differentials add more than this share of the full's stored bytes.
    max_diff_share: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


#: zstd's levels: 0 stores blobs uncompressed, 22 is zstd's strongest.
MAX_COMPRESSION_LEVEL = 22
#: The largest pack a writer fills: each pack in flight is a buffer of this size and a quarter more (a 64 GiB
#: pack size made every backup fail for memory), and a pack's offsets are 32-bit.
MAX_PACK_SIZE = 256 << 20


def check_settings(settings: Settings) -> None:
    """UsageError for settings no repository can work with, before anything is written: a bad value given
    to ``init`` is the caller's mistake, not an internal error."""
    from chunkvault.chunker import ChunkerParams

    try:
        ChunkerParams.from_dict(settings.chunker)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    check_compression_level(settings.compression_level)
    if _not_int(settings.pack_size) or not 1 <= settings.pack_size <= MAX_PACK_SIZE:
        raise UsageError(f"pack size must be 1 byte to {MAX_PACK_SIZE >> 20} MiB, not {settings.pack_size!r}")
    if _not_int(settings.full_every) or settings.full_every < 0:
        raise UsageError(f"full_every must be 0 or more differentials, not {settings.full_every!r}")
    share = settings.max_diff_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise UsageError(f"max_diff_share must be a share from 0 to 1, not {share!r}")


#: The settings ``config set`` changes, each taking effect from the next command that uses it.
CHANGEABLE_SETTINGS = ("compression_level", "pack_size", "full_every", "max_diff_share")
#: What stays as ``init`` made it, and why.
FIXED_SETTINGS = {
    "chunker": "the chunker parameters are fixed when a repository is created: other chunk boundaries would "
               "deduplicate against nothing stored; `copy` the snapshots to a repository made with other parameters",
    "id": "the repository id is fixed when a repository is created: every key file and object is bound to it",
}


def changed_settings(settings: Settings, changes: dict[str, Any]) -> Settings:
    """``settings`` with ``changes`` (stored names to values) applied, checked as ``init`` checks them; a
    UsageError for a setting that cannot change or does not exist.  Pure: ``settings`` is left as it is."""
    for name in changes:
        if name in FIXED_SETTINGS:
            raise UsageError(FIXED_SETTINGS[name])
        if name not in CHANGEABLE_SETTINGS:
            raise UsageError(f"no setting {name!r} (one of {', '.join(CHANGEABLE_SETTINGS)})")
    new = replace(settings, chunker=dict(settings.chunker), extra=dict(settings.extra), **changes)
    check_settings(new)
    return new


def settings_differences(old: Settings, new: Settings) -> dict[str, tuple[Any, Any]]:
    """Each changeable setting whose value differs: name -> (old, new)."""
    return {n: (getattr(old, n), getattr(new, n)) for n in CHANGEABLE_SETTINGS if getattr(old, n) != getattr(new, n)}


MAX_KDF_SECONDS = 60.0  # beyond, the memory a derivation is tuned to would grow past what readers accept


def check_kdf_seconds(seconds: float) -> None:
    """UsageError unless ``seconds`` is a CPU time a key derivation can be tuned to (0: the cheapest)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_KDF_SECONDS:
        raise UsageError(f"key derivation time must be from 0 to {MAX_KDF_SECONDS:g} seconds, not {seconds!r}")


def check_compression_level(level: Any) -> None:
    """UsageError for anything but a zstd level chunkvault writes: 0 (off) to ``MAX_COMPRESSION_LEVEL``."""
    if _not_int(level) or not 0 <= level <= MAX_COMPRESSION_LEVEL:
        raise UsageError(f"compression level must be 0 (off) to {MAX_COMPRESSION_LEVEL}, not {level!r}")


def _not_int(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


@dataclass
class RepoConfig:
    repo_id: str
    created: str
    settings: Settings
    format: int = 1  # as stored: raised only by what an older chunkvault would misread (FORMAT_WAL)

    def ad(self) -> bytes:
        """What the sealed settings are bound to: the config's own ``format`` (a later reader opens an
        earlier format's config by the number it holds) and the repository id, as ASCII."""
        return CONFIG_AD + int(self.format).to_bytes(4, "little") + self.repo_id.encode()

    def encode(self, sealer: Sealer) -> bytes:
        sealed = sealer.seal(json.dumps(asdict(self.settings), sort_keys=True).encode(), self.ad())
        return json.dumps({"format": self.format, "id": self.repo_id, "created": self.created,
                           "sealed": _b64(sealed)}, indent=1).encode()


def peek_config(data: bytes) -> dict[str, Any]:
    """The clear part of the config; raises UnsupportedFormat for a newer format."""
    obj = _json(data, "config")
    fmt = obj.get("format")
    if not isinstance(fmt, int):
        raise CorruptObject("config", "no format version")
    if fmt > FORMAT_VERSION:
        raise UnsupportedFormat(f"repository format {fmt} is newer than this chunkvault supports ({FORMAT_VERSION}); upgrade chunkvault")
    if fmt < 1 or not isinstance(obj.get("id"), str) or not isinstance(obj.get("sealed"), str):
        raise CorruptObject("config", "malformed config")
    return obj


def open_config(data: bytes, sealer: Sealer) -> RepoConfig:
    obj = peek_config(data)
    cfg = RepoConfig(obj["id"], str(obj.get("created", "")), Settings(chunker={}), int(obj["format"]))
    try:
        plain = sealer.open(_unb64(obj["sealed"], "config"), cfg.ad())
    except AuthenticationFailed:
        raise CorruptObject("config", "authentication failed (tampered, or not this repository's)") from None
    s = _json(plain, "config")
    try:
        cfg.settings = Settings(**s)
    except TypeError:
        raise CorruptObject("config", "unknown settings") from None
    _check_chunker(cfg.settings.chunker)
    return cfg


def _check_chunker(chunker: Any) -> None:
    """CorruptObject for authenticated chunker parameters no chunker takes (missing, of another kind, out of
    range): every command opening the repository derives its chunker from them, and such a config made
    each one an internal error.  Only these are checked on reading: a repository whose other settings a
    later release bounds (its pack size, say) must still open to be read and set right."""
    from chunkvault.chunker import ChunkerParams

    try:
        ChunkerParams.from_dict(chunker)
    except (TypeError, ValueError) as exc:
        raise CorruptObject("config", f"malformed chunker settings ({exc})") from None


def new_config(settings: Settings) -> RepoConfig:
    return RepoConfig(os.urandom(16).hex(), datetime.now(timezone.utc).isoformat(), settings)


# --- key files ----------------------------------------------------------------


KDF_ARGON2ID = "argon2id"
KDF_SCRYPT = "scrypt"
KDF_SECRET = "secret"
KDF_COST_FIELDS = {KDF_ARGON2ID: ("t", "m", "p"), KDF_SCRYPT: ("log_n", "r", "p"), KDF_SECRET: ()}
KEY_SALT_SIZE = 16
#: The most a key file is read to: chunkvault's are a few hundred bytes.  Read whole, one planted or grown to
#: gigabytes made every command that opens the repository read all of it, `key list` and `key remove` (the way
#: to be rid of it) too, each running out of memory at its size.
KEY_FILE_LIMIT = 64 << 10
#: The most an older key file's scrypt may ask for: what ``init`` wrote before Argon2id, never more (no key
#: file is made with scrypt any longer).  r was 8; the first releases tuned N alone to the time (log_n up to
#: 19, 512 MiB, on fast machines), later ones N to 32 MiB and up to 64 lanes, N growing only past 64 lanes.
SCRYPT_KEY_MAX_MEMORY = scrypt_memory(MAX_LOG_N, SCRYPT_R)  # 512 MiB
SCRYPT_KEY_MAX_WORK = MAX_P * SCRYPT_KEY_MAX_MEMORY  # 32 GiB over all lanes


@dataclass
class KeyFile:
    name: str
    created: str
    host: str
    user: str
    kdf: str
    cost: dict[str, int]  # the derivation's parameters, named as in the file (KDF_COST_FIELDS)
    salt: bytes
    wrapped: bytes
    repo: str = ""  # the repository id, in clear: tells a damaged config from a wrong password

    def encode(self) -> bytes:
        return json.dumps({"kdf": self.kdf, **self.cost, "salt": _b64(self.salt), "created": self.created,
                           "host": self.host, "user": self.user, "repo": self.repo, "data": _b64(self.wrapped)},
                          indent=1).encode()

    @classmethod
    def decode(cls, name: str, data: bytes) -> "KeyFile":
        what = f"keys/{name}"
        if content_name(data)[: len(name)] != name:
            raise CorruptObject(what, "content does not match its name")
        obj = _json(data, what)
        if "kdf" not in obj:
            raise CorruptObject(what, "malformed key file")
        kdf = obj["kdf"]
        if not isinstance(kdf, str) or kdf not in KDF_COST_FIELDS:
            raise NewerObject(what, f"unknown key derivation {kdf!r}: a newer chunkvault's key (upgrade chunkvault "
                                    "to use it) or not chunkvault's")
        try:
            cost = {f: obj[f] for f in KDF_COST_FIELDS[kdf]}
            if any(type(v) is not int for v in cost.values()):  # not a bool, float or string
                raise ValueError
            salt = _unb64(obj["salt"], what)
            if len(salt) != KEY_SALT_SIZE:  # Argon2 refuses one under 8 bytes with its own exception
                raise ValueError
            return cls(name, str(obj.get("created", "")), str(obj.get("host", "")), str(obj.get("user", "")),
                       kdf, cost, salt, _unb64(obj["data"], what), str(obj.get("repo", "")))
        except (KeyError, ValueError, TypeError):
            raise CorruptObject(what, "malformed key file") from None

    @property
    def work(self) -> int:
        """Roughly what deriving its key costs, in KiB of memory passed over: to try cheap keys first."""
        c = self.cost
        if self.kdf == KDF_ARGON2ID:
            return c["t"] * c["m"]
        if self.kdf == KDF_SCRYPT:
            return (1 << c["log_n"]) * c["r"] * c["p"] // 4
        return 0

    def unwrap(self, password: bytes, repo_id: str) -> KeyMaterial:
        """The key material, or WrongPassword."""
        return self.open_with(self.kek(password), repo_id)

    def cost_problem(self) -> str | None:
        """Why this key file's key is not to be derived, or None: parameters out of range, or a cost beyond
        what ``init`` and ``key add`` write (``store/FORMAT.md``).  Every key file is tried with a mistyped
        password, so one planted asking for more would make each such attempt pay it; it cannot be ours."""
        c = self.cost
        if self.kdf == KDF_ARGON2ID:
            t, m, p = c["t"], c["m"], c["p"]
            if not (1 <= p <= MAX_P and 8 * p <= m and 1 <= t):
                return "key derivation parameters out of range"
            if m > ARGON2_MAX_MEMORY_KIB or t * m > ARGON2_MAX_WORK_KIB:
                return (f"its key derivation asks for Argon2id over {_memory(m << 10)}, {t} time(s) "
                        f"({_memory(t * m << 10)} over all passes), more than chunkvault writes (at most "
                        f"{_memory(ARGON2_MAX_MEMORY_KIB << 10)}, and {_memory(ARGON2_MAX_WORK_KIB << 10)} over all passes)")
            if t > ARGON2_MAX_PASSES:  # each pass starts its lanes' threads: over little memory, passes cost that
                return (f"its key derivation asks for Argon2id over {_memory(m << 10)}, {t} time(s), more than "
                        f"chunkvault writes (at most {ARGON2_MAX_PASSES} passes)")
        elif self.kdf == KDF_SCRYPT:
            log_n, r, p = c["log_n"], c["r"], c["p"]
            if not (MIN_LOG_N <= log_n <= MAX_LOG_N and 1 <= r <= MAX_R and 1 <= p <= MAX_P):
                return "key derivation parameters out of range"
            memory = scrypt_memory(log_n, r)
            if memory > SCRYPT_KEY_MAX_MEMORY or p * memory > SCRYPT_KEY_MAX_WORK:
                return (f"its key derivation asks for scrypt over {_memory(memory)} in {p} lane(s), more than "
                        f"chunkvault writes (at most {_memory(SCRYPT_KEY_MAX_MEMORY)}, and {_memory(SCRYPT_KEY_MAX_WORK)} "
                        "over all lanes)")
        return None

    def kek(self, password: bytes) -> bytes:
        """The key that wraps the key material, derived from ``password`` (the costly half of ``unwrap``)."""
        if self.kdf == KDF_SECRET:
            if not is_secret(password):
                raise WrongPassword("this key opens with a generated key secret only")
            return derive_secret_kek(password, self.salt)
        problem = self.cost_problem()
        if problem is not None:  # refused before anything is derived
            raise CorruptObject(f"keys/{self.name}", problem)
        try:
            return _password_kek(self.kdf, self.cost, password, self.salt)
        except ValueError:
            raise CorruptObject(f"keys/{self.name}", "key derivation parameters out of range") from None

    def open_with(self, kek: bytes, repo_id: str) -> KeyMaterial:
        """The key material under ``kek``, or WrongPassword."""
        try:
            raw = Sealer(kek).open(self.wrapped, KEY_AD + repo_id.encode())
        except AuthenticationFailed:
            raise WrongPassword("wrong password or no key found for it") from None
        try:
            return KeyMaterial.from_bytes(raw)
        except ValueError:  # authentic, so sealed so by a writer holding the password: not a wrong password
            raise CorruptObject(f"keys/{self.name}", f"its key material is {len(raw)} bytes, not 96") from None


def _memory(n: int) -> str:
    """``n`` bytes in the largest of GiB, MiB and KiB that holds it whole: a bound's excess is never
    rounded away ("over 64 MiB" of 64 MiB and 1 KiB)."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _password_kek(kdf: str, cost: dict[str, int], password: bytes, salt: bytes) -> bytes:
    if kdf == KDF_ARGON2ID:
        return derive_argon2id(password, salt, cost["t"], cost["m"], cost["p"])
    return derive_kek(password, salt, cost["log_n"], cost["r"], cost["p"])


def make_key_file(material: KeyMaterial, password: bytes, repo_id: str, *, kdf_seconds: float = 0.5,
                  log_n: int | None = None) -> tuple[str, bytes]:
    """(object name, bytes) of a new key file wrapping ``material`` under ``password``.

    A generated key secret (``crypto.new_secret``) gets a key file without
    stretching; any other password gets Argon2id costing ``kdf_seconds`` of
    CPU (``tune_argon2id``), or scrypt at cost ``2**log_n`` when that is given.
    """
    salt = os.urandom(KEY_SALT_SIZE)
    secret = as_secret(password)
    if is_secret(secret):  # a secret copied with blanks or in capitals: the secret's key
        password = secret
        kdf, cost = KDF_SECRET, {}
        kek = derive_secret_kek(password, salt)
    else:
        if log_n is not None:
            kdf, cost = KDF_SCRYPT, {"log_n": log_n, "r": SCRYPT_R, "p": SCRYPT_P}
        else:
            kdf, cost = KDF_ARGON2ID, dict(zip(KDF_COST_FIELDS[KDF_ARGON2ID], tune_argon2id(kdf_seconds)))
        kek = _password_kek(kdf, cost, password, salt)
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in a container: not worth failing for
        user = ""
    kf = KeyFile("", datetime.now(timezone.utc).isoformat(), os.uname().nodename, user, kdf, cost, salt,
                 Sealer(kek).seal(material.to_bytes(), KEY_AD + repo_id.encode()), repo_id)
    data = kf.encode()
    return content_name(data)[:32], data
