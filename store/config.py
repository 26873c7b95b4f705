"""The repository's config object and its password-wrapped key files.

``config`` is JSON: the format version and repository id in clear (so a newer
format is reported before any password is asked), the settings sealed under
the repository key with the version and id as associated data.
``keys/<name>`` wraps the key material under a key derived from a password
(scrypt) or from a generated key secret (a keyed hash: 256 random bits need no
stretching); any one password or secret opens the repository.
"""
from __future__ import annotations

import base64
import getpass
import json
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from chunkvault.errors import CorruptObject, UnsupportedFormat, WrongPassword

from .crypto import (
    SCRYPT_P, SCRYPT_R, AuthenticationFailed, KeyMaterial, Sealer, content_name, derive_kek, derive_secret_kek,
    is_secret, tune_scrypt,
)

FORMAT_VERSION = 1
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
    except (ValueError, UnicodeDecodeError):
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


@dataclass
class RepoConfig:
    repo_id: str
    created: str
    settings: Settings

    def ad(self) -> bytes:
        return CONFIG_AD + FORMAT_VERSION.to_bytes(4, "little") + self.repo_id.encode()

    def encode(self, sealer: Sealer) -> bytes:
        sealed = sealer.seal(json.dumps(asdict(self.settings), sort_keys=True).encode(), self.ad())
        return json.dumps({"format": FORMAT_VERSION, "id": self.repo_id, "created": self.created,
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
    cfg = RepoConfig(obj["id"], str(obj.get("created", "")), Settings(chunker={}))
    try:
        plain = sealer.open(_unb64(obj["sealed"], "config"), cfg.ad())
    except AuthenticationFailed:
        raise CorruptObject("config", "authentication failed (tampered, or not this repository's)") from None
    s = _json(plain, "config")
    try:
        cfg.settings = Settings(**s)
    except TypeError:
        raise CorruptObject("config", "unknown settings") from None
    return cfg


def new_config(settings: Settings) -> RepoConfig:
    return RepoConfig(os.urandom(16).hex(), datetime.now(timezone.utc).isoformat(), settings)


# --- key files ----------------------------------------------------------------


KDF_SCRYPT = "scrypt"
KDF_SECRET = "secret"


@dataclass
class KeyFile:
    name: str
    created: str
    host: str
    user: str
    log_n: int  # scrypt's parameters; 0 for a secret's key file
    r: int
    p: int
    salt: bytes
    wrapped: bytes
    repo: str = ""  # the repository id, in clear: tells a damaged config from a wrong password
    kdf: str = KDF_SCRYPT

    def encode(self) -> bytes:
        head: dict[str, Any] = {"kdf": self.kdf}
        if self.kdf == KDF_SCRYPT:
            head.update(log_n=self.log_n, r=self.r, p=self.p)
        return json.dumps({**head, "salt": _b64(self.salt), "created": self.created, "host": self.host,
                           "user": self.user, "repo": self.repo, "data": _b64(self.wrapped)}, indent=1).encode()

    @classmethod
    def decode(cls, name: str, data: bytes) -> "KeyFile":
        what = f"keys/{name}"
        if content_name(data)[: len(name)] != name:
            raise CorruptObject(what, "content does not match its name")
        obj = _json(data, what)
        if "kdf" not in obj:
            raise CorruptObject(what, "malformed key file")
        kdf = obj["kdf"]
        if kdf not in (KDF_SCRYPT, KDF_SECRET):
            raise UnsupportedFormat(f"{what}: unknown key derivation {kdf!r}")
        try:
            cost = (int(obj["log_n"]), int(obj["r"]), int(obj["p"])) if kdf == KDF_SCRYPT else (0, 0, 0)
            return cls(name, str(obj.get("created", "")), str(obj.get("host", "")), str(obj.get("user", "")),
                       *cost, _unb64(obj["salt"], what), _unb64(obj["data"], what), str(obj.get("repo", "")), kdf)
        except (KeyError, ValueError, TypeError):
            raise CorruptObject(what, "malformed key file") from None

    def unwrap(self, password: bytes, repo_id: str) -> KeyMaterial:
        """The key material, or WrongPassword."""
        if self.kdf == KDF_SECRET:
            if not is_secret(password):
                raise WrongPassword("this key opens with a generated key secret only")
            kek = derive_secret_kek(password, self.salt)
        else:
            try:
                kek = derive_kek(password, self.salt, self.log_n, self.r, self.p)
            except ValueError:
                raise CorruptObject(f"keys/{self.name}", "key derivation parameters out of range") from None
        try:
            raw = Sealer(kek).open(self.wrapped, KEY_AD + repo_id.encode())
        except AuthenticationFailed:
            raise WrongPassword("wrong password or no key found for it") from None
        return KeyMaterial.from_bytes(raw)


def make_key_file(material: KeyMaterial, password: bytes, repo_id: str, *, kdf_seconds: float = 0.5,
                  log_n: int | None = None) -> tuple[str, bytes]:
    """(object name, bytes) of a new key file wrapping ``material`` under ``password``.

    A generated key secret (``crypto.new_secret``) gets a key file without
    scrypt; any other password gets scrypt tuned to ``kdf_seconds``.
    """
    salt = os.urandom(16)
    if is_secret(password):
        kdf, log_n, p = KDF_SECRET, 0, 0
        kek = derive_secret_kek(password, salt)
    else:
        kdf, p = KDF_SCRYPT, SCRYPT_P
        if log_n is None:
            log_n, p = tune_scrypt(kdf_seconds)
        kek = derive_kek(password, salt, log_n, SCRYPT_R, p)
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in a container: not worth failing for
        user = ""
    kf = KeyFile("", datetime.now(timezone.utc).isoformat(), socket.gethostname(), user, log_n,
                 SCRYPT_R if kdf == KDF_SCRYPT else 0, p, salt,
                 Sealer(kek).seal(material.to_bytes(), KEY_AD + repo_id.encode()), repo_id, kdf)
    data = kf.encode()
    return content_name(data)[:32], data
