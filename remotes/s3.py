"""S3 (and S3-compatible) remote via boto3.

URL ``s3://bucket[/prefix]``.  Credentials come only from the usual AWS chain
(environment, shared credentials/config files, profile, instance role), never
from the URL, so they cannot leak into logs.  The client does almost no retrying
of its own: the retry layer above every remote (``remotes.layer``) does that, and
this module only sorts S3's failures into transient and permanent ones.
"""
from __future__ import annotations

import re
import time
from typing import Any, Iterator
from urllib.parse import urlparse

from chunkvault.errors import (
    ObjectArchived,
    ObjectExists,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
    RemoteUnavailable,
    RepositoryNotFound,
    UsageError,
)
from chunkvault.units import parse_size

from .base import (X509_NAME_MISMATCH, ObjectInfo, Remote, cert_failure, cert_hint, connections_option,
                   from_environment, is_key, is_loopback, keyword_options, number_option, refuse_unknown_options,
                   served_range, spelled, text_after_bracket, timeout_option, validate_key, validate_prefix)

MiB = 1024 * 1024
#: The options a variable of the environment gives where none is given (the first set, in order).
ENVIRONMENT_OPTIONS = {"endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")}
DATA_PREFIX = "data/"
# Where objects large enough to go up in parts live: a prune aborts only those uploads.
LARGE_OBJECT_PREFIXES = (DATA_PREFIX, "index/")
ARCHIVE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})  # an object there must be restored before a read
ADDRESSING_STYLES = ("auto", "path", "virtual")
STORAGE_CLASSES = frozenset(
    {
        "STANDARD",
        "REDUCED_REDUNDANCY",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER",
        "GLACIER_IR",
        "DEEP_ARCHIVE",
        "OUTPOSTS",
        "SNOW",
        "EXPRESS_ONEZONE",
    }
)
#: Reads of an object whose body does not match the checksum S3 sends with it, before it is taken as stored so.
CHECKSUM_READS = 3
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
# A prefix is any text S3 takes in a key (``backups/Host A/``, ``ü``, as restic takes it) but for empty, "."
# and ".." segments (which stores on a file system resolve) and control characters; within S3's 1,024 bytes
# a key may hold, with room for the repository's own keys below it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_PREFIX_BYTES = 768

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "ConditionalRequestConflict",  # concurrent conditional writes: retry and see who won
    "OperationAborted",
    "BadDigest",
    "XAmzContentSHA256Mismatch",  # a body changed on the way from the hash signed with it (plain HTTP): as BadDigest
    "IncompleteBody",
}


class _ChecksumMismatch(Exception):
    """A body that does not match the checksum S3 sent with it (``S3Remote.get`` reads it again)."""


def _verify_reason(exc: Exception) -> str:
    """What a failed certificate verification says (self-signed, expired, another name), from its message."""
    match = re.search(r"certificate verify failed: ([^()\]'\"]+)", str(exc))
    return match.group(1).strip() if match else "certificate verify failed"


def _certificate_fault(exc: Exception) -> tuple[str, int | None] | None:
    """(what is wrong, OpenSSL's verify code) with the endpoint's certificate, else None.  urllib3, not
    OpenSSL, checks the name for botocore: a certificate of another name failed as a bare SSLError, retried
    as an outage."""
    from urllib3.util.ssl_match_hostname import CertificateError

    failure = cert_failure(exc)
    if failure is not None:
        return failure.verify_message or _verify_reason(exc), failure.verify_code
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, CertificateError):
            return str(cause), X509_NAME_MISMATCH[0]
        cause = cause.__cause__ or cause.__context__
    return (_verify_reason(exc), None) if "CERTIFICATE_VERIFY_FAILED" in str(exc) else None


def _int_option(name: str, value: Any, minimum: int) -> int:
    return int(number_option("S3", name, value, minimum, int))


def _name_option(name: str, value: Any) -> str | None:
    """A name the S3 client takes as text (a region, a profile, a storage class): a number given from the
    API ended in the client's TypeError, an internal error."""
    if value is not None and not isinstance(value, str):
        raise UsageError(f"S3 option {spelled(name)} must be text, not {value!r}")
    return value


def _size_option(name: str, value: Any) -> int:
    """A size in bytes, or with a unit as ``--pack-size`` takes it (``16M``)."""
    try:
        return parse_size(value)
    except UsageError:
        raise UsageError(f"S3 option {spelled(name)} must be a size (bytes, or e.g. 16M), not {value!r}") from None


def _timestamp(text: str) -> Any:
    """A listing's LastModified (ISO 8601, as S3 gives it) read by the standard library: botocore's default
    parser, dateutil, took 50 us a key, a tenth of a second per thousand objects listed, and a listing of a
    year of hourly snapshots is repeated by every backup.  Other forms (a HEAD's HTTP date) go to botocore's."""
    import datetime

    import botocore.utils

    try:
        parsed = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return botocore.utils.parse_timestamp(text)
    return parsed if parsed.tzinfo is not None else botocore.utils.parse_timestamp(text)


def parse_s3_url(url: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into (bucket, prefix); prefix is "" or ends in "/"."""
    parsed = urlparse(url)
    if parsed.scheme.lower() != "s3":
        raise UsageError(f"not an s3:// URL: {url!r}")
    authority = url.split("/", 3)[2] if url.count("/") >= 2 else ""  # as written: "?" or "#" ends urlparse's
    if "@" in parsed.netloc or "@" in authority or parsed.password is not None:
        # Do not echo the URL: it holds a secret.
        raise UsageError(
            "credentials do not belong in an s3:// URL; use the AWS environment, "
            "a profile or the AWS config files"
        )
    if "?" in url or "#" in url or parsed.params:  # an empty one too: "s3://b/Host A?" lost its "?" unsaid
        raise UsageError(f"s3:// URL takes no query or fragment: {url!r}")
    bucket = parsed.netloc
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise UsageError(f"invalid S3 bucket name {bucket!r} in {url!r}")
    prefix = parsed.path.strip("/")
    if prefix:
        fault = _prefix_fault(prefix)
        if fault:
            raise UsageError(f"invalid prefix {prefix[:80]!r}{'...' if len(prefix) > 80 else ''} in the S3 URL: "
                             f"{fault}")
        prefix += "/"
    return bucket, prefix


def _prefix_fault(prefix: str) -> str:
    """What is wrong with a repository's prefix in its bucket ("" when nothing is)."""
    try:
        size = len(prefix.encode())
    except UnicodeEncodeError:  # bytes of no UTF-8 on the command line: S3 keys are UTF-8
        return "not UTF-8"
    if _CONTROL.search(prefix):
        return "a control character"
    if {"", ".", ".."} & set(prefix.split("/")):
        return "an empty, '.' or '..' segment"
    return f"longer than {MAX_PREFIX_BYTES} bytes" if size > MAX_PREFIX_BYTES else ""


def check_endpoint_url(url: str) -> None:
    """UsageError for an endpoint URL that names no server to connect to: botocore took an unclosed [ for an
    internal error, a port beyond 65535 or a query for a failed request (exit 14), and port 0 or a port
    written after ``]`` without its colon for an outage, retried for half a minute."""
    if "@" in _authority(url):  # not echoed: it holds a secret
        raise UsageError("credentials do not belong in the S3 endpoint URL")
    reason = _endpoint_fault(url)
    if reason:  # shown without a query or fragment, where a secret may have been put
        raise UsageError(f"S3 endpoint URL {re.split(r'[?#]', url, maxsplit=1)[0]!r}: {reason}")


def _authority(url: str) -> str:
    """The part of a URL that names the host, with any user and password: after the scheme's ``//``, or from
    the start where the URL has no ``//`` (``user:secret@host:9000`` was echoed as a URL of no scheme)."""
    rest = url.partition("//")[2] if "//" in url else url
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


def _endpoint_fault(url: str) -> str:
    """What is wrong with an endpoint URL without credentials ("" when nothing is)."""
    try:
        ep = urlparse(url)
        port = ep.port
    except ValueError as exc:  # an unclosed [, a port that is no number or beyond 65535
        return "invalid port (1 to 65535; an IPv6 address in brackets: [ADDRESS]:PORT)" if "Port" in str(exc) else str(exc)
    if ep.scheme.lower() not in ("http", "https") or not ep.hostname:
        return "not an http:// or https:// URL of a host"
    if port == 0:
        return "invalid port (1 to 65535; an IPv6 address in brackets: [ADDRESS]:PORT)"
    if text_after_bracket(ep.netloc):
        return f"{text_after_bracket(ep.netloc)!r} after the IPv6 address where a port goes: write [ADDRESS]:PORT"
    if ep.query or ep.fragment or ep.params:
        return "an endpoint takes no query or fragment"
    return ""


def _direct_for_loopback(endpoint_url: str | None) -> dict[str, str] | None:
    """No proxy (an empty mapping: botocore then reads none from the environment) for an endpoint on this
    machine's loopback, else None (HTTP_PROXY, HTTPS_PROXY and NO_PROXY as botocore reads them).  A proxy
    set for the whole machine was sent a loopback endpoint's requests, which it cannot reach (its loopback is
    not ours): a 502 or a failed connection each time, retried as an outage.  Go's clients (restic's) never
    proxy loopback either."""
    host = urlparse(endpoint_url).hostname if endpoint_url else None
    return {} if host and is_loopback(host) else None


def _connection_reason(exc: Exception) -> str:
    """Why botocore could not connect, in a few words: the proxy it could not reach (its password masked by
    botocore), the system's reason (no such host, refused), else the error's name."""
    import botocore.exceptions as bce

    kwargs = getattr(exc, "kwargs", None) or {}
    if isinstance(exc, bce.ProxyConnectionError):
        return f"cannot reach the proxy {kwargs.get('proxy_url')} (from HTTP_PROXY or HTTPS_PROXY)"
    cause: BaseException | None = kwargs.get("error")
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__


class S3Remote(Remote):
    """Objects under ``prefix`` in one S3 bucket; one thread-safe boto3 client per remote."""

    #: a whole read is checked against the checksum S3 sends with it, else against the object's size (``_get``)
    checks_read_length = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        addressing_style: str = "auto",
        storage_class: str | None = None,
        multipart_threshold: int = 64 * MiB,
        multipart_part_size: int = 16 * MiB,
        max_pool_connections: int = 16,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        client_attempts: int = 1,
    ):
        import boto3
        import botocore.config
        import botocore.exceptions
        import botocore.session

        self.bucket = bucket
        self.prefix = prefix
        self.display_url = f"s3://{bucket}/{prefix}"
        region, profile, storage_class = (_name_option(name, value) for name, value in (
            ("region", region), ("profile", profile), ("storage_class", storage_class)))
        if addressing_style not in ADDRESSING_STYLES:
            raise UsageError(f"S3 addressing style must be one of {', '.join(ADDRESSING_STYLES)}, not {addressing_style!r}")
        if storage_class is not None:
            storage_class = storage_class.upper()
            if storage_class not in STORAGE_CLASSES:
                raise UsageError(f"unknown S3 storage class {storage_class!r}")
            if storage_class in ARCHIVE_CLASSES:  # data packs are read back at every backup
                raise UsageError(f"S3 storage class {storage_class} cannot be read without a restore, and data "
                                 "packs are read at every backup (the manifests, the bases of deltas): use "
                                 "GLACIER_IR, or a lifecycle rule that archives what no backup reads")
        self.data_storage_class = storage_class  # for data packs only
        self.multipart_threshold = _size_option("multipart_threshold", multipart_threshold)
        self.multipart_part_size = _size_option("multipart_part_size", multipart_part_size)
        if not 5 * MiB <= self.multipart_part_size <= 5 * 1024 * MiB:  # S3's bounds: refused after each upload
            raise UsageError(f"S3 option {spelled('multipart_part_size')} must be from 5M to 5G (S3's bounds "
                             f"on a part), not {self.multipart_part_size}")
        endpoint_url = endpoint_url or from_environment(ENVIRONMENT_OPTIONS["endpoint_url"])
        if endpoint_url:
            check_endpoint_url(endpoint_url)
        self.endpoint_url = endpoint_url
        config = botocore.config.Config(
            region_name=region,
            connect_timeout=timeout_option("S3", "connect_timeout", connect_timeout),
            read_timeout=timeout_option("S3", "read_timeout", read_timeout),
            max_pool_connections=connections_option("S3", "max_pool_connections", max_pool_connections),
            retries={"total_max_attempts": _int_option("client_attempts", client_attempts, 1), "mode": "standard"},
            s3={"addressing_style": addressing_style},
            proxies=_direct_for_loopback(endpoint_url),
            response_checksum_validation="when_required",  # asked for by ``get`` itself (ChecksumMode)
        )
        try:
            core = botocore.session.get_session()
            core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
            session = boto3.session.Session(botocore_session=core, profile_name=profile)
            region = region or session.region_name or "us-east-1"
            self._client = session.client("s3", region_name=region, endpoint_url=endpoint_url, config=config)
        except botocore.exceptions.ProfileNotFound as exc:
            # AWS_PROFILE names it where no option does: say which one, and where it was looked for
            named = profile or exc.kwargs.get("profile")
            source = "" if profile else " (from AWS_PROFILE)"
            raise UsageError(f"AWS profile {named!r}{source} not found in the AWS config or credentials files") from None
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError,
                botocore.exceptions.CredentialRetrievalError) as exc:
            # found while the client is made (half of a key pair set, a credential_process that fails): the
            # same refusal, exit 14, as when the first request finds no credentials
            raise self._error(exc, "connect", None) from None
        except (ValueError, botocore.exceptions.BotoCoreError) as exc:
            raise UsageError(f"cannot set up the S3 client for {self.display_url}: {exc}") from None
        self.region = region
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "S3Remote":
        """Options: endpoint_url, region, profile, addressing_style, storage_class,
        multipart_threshold, multipart_part_size, max_pool_connections,
        connect_timeout, read_timeout, client_attempts."""
        bucket, prefix = parse_s3_url(url)
        refuse_unknown_options("S3", options, keyword_options(cls.__init__))
        return cls(bucket, prefix, **{k: v for k, v in options.items() if v is not None})

    # -- error mapping ------------------------------------------------------

    def _error(self, exc: Exception, op: str, key: str | None, *, if_absent: bool = False, where: str = "") -> RemoteError:
        """Sort a botocore failure into the chunkvault error hierarchy (one clear line)."""
        import botocore.exceptions as bce

        where = f"{self.display_url}{key or where}"
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            message = err.get("Message") or code or f"HTTP {status}"
            if if_absent and key is not None and (code == "PreconditionFailed" or status == 412):
                return ObjectExists(key)
            if code == "NoSuchBucket":
                return RepositoryNotFound(f"S3 bucket {self.bucket!r} does not exist ({self.display_url})")
            if code in ("PermanentRedirect", "301") or status == 301:
                # the bucket is in another region than the endpoint's (a HEAD's 301 has no body: "Moved
                # Permanently" was all it said); S3 names the bucket's region in a header
                region = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("x-amz-bucket-region")
                there = f"region {region}" if region else "another region"
                asked = self.endpoint_url or f"the endpoint of {self.region}"
                fix = f"-o s3.region={region} and that region's endpoint" if region else "the bucket's region"
                return RemoteError(f"S3 {op} {where}: the bucket is in {there}, not at {asked}: give {fix}")
            if key is not None and (code in _NOT_FOUND or status == 404):
                return ObjectNotFound(key)
            if code == "InvalidObjectState":  # S3 answers it with 403 too: no permission is missing
                return ObjectArchived(f"S3 {op} {where}: object is in an archive storage class; restore it first "
                                      "(S3's RestoreObject, e.g. `aws s3api restore-object`)")
            if code in _DENIED or status == 403:
                return PermissionDenied(f"S3 denied {op} {where}: {message}")
            if code == "NotImplemented" or status == 501:  # an S3-compatible store without that request
                return RemoteError(f"S3 {op} {where}: not supported by this store ({code or status}: {message})")
            if code in _TRANSIENT or status >= 500 or status in (408, 429):
                return RemoteUnavailable(f"S3 {op} {where} failed, try again: {code or status} {message}")
            return RemoteError(f"S3 {op} {where} failed: {code or status}: {message}")
        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
            # which half is missing, which credential_process failed: botocore says; "none found" it does not need
            detail = "" if isinstance(exc, bce.NoCredentialsError) else f": {str(exc).strip().rstrip(':')}"
            return PermissionDenied(
                f"no usable AWS credentials for {self.display_url}{detail} "
                "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the AWS config files)"
            )
        fault = _certificate_fault(exc) if isinstance(exc, bce.SSLError) else None
        if fault is not None:
            # not an outage: retried, it failed the same way for half a minute, said as "SSLError" alone
            reason, code = fault
            hint = cert_hint(code, "endpoint", "a private CA's certificate is given with AWS_CA_BUNDLE")
            return PermissionDenied(f"the TLS certificate of {self.endpoint_url or 'S3'} does not verify for {op} "
                                    f"{where} ({reason}): {hint}")
        if isinstance(exc, (bce.ConnectionError, bce.HTTPClientError, bce.ResponseStreamingError, bce.IncompleteReadError)):
            reason = _connection_reason(exc)
            if reason.startswith("cannot reach the proxy"):
                return RemoteUnavailable(f"{reason} for {op} {where}")
            return RemoteUnavailable(f"cannot reach {self.endpoint_url or 'S3'} for {op} {where}: {reason}")
        if isinstance(exc, bce.ParamValidationError):
            return UsageError(f"S3 {op} {where}: {exc}")
        return RemoteError(f"S3 {op} {where} failed: {type(exc).__name__}: {exc}")

    def _call(self, op: str, key: str, fn: Any, *, if_absent: bool = False, **kwargs: Any) -> Any:
        import botocore.exceptions as bce

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._error(exc, op, key, if_absent=if_absent) from None

    # -- the interface ------------------------------------------------------

    def _storage_class(self, key: str) -> dict[str, str]:
        if self.data_storage_class and key.startswith(DATA_PREFIX):
            return {"StorageClass": self.data_storage_class}
        return {}

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        validate_key(key)
        body = data if isinstance(data, bytes) else bytes(data)
        extra = self._storage_class(key)
        if len(body) > self.multipart_threshold:
            self._put_multipart(key, body, if_absent, extra)
            return
        if if_absent:
            extra["IfNoneMatch"] = "*"
        self._call("put", key, self._client.put_object, if_absent=if_absent, Key=self.prefix + key, Body=body, **extra)

    def _put_multipart(self, key: str, body: bytes, if_absent: bool, extra: dict[str, str]) -> None:
        """Parts uploaded in order; parallelism comes from uploading several objects at once."""
        full = self.prefix + key
        if if_absent and self.stat(key) is not None:
            raise ObjectExists(key)  # cheap early exit; the conditional complete below decides
        upload = self._call("put", key, self._client.create_multipart_upload, Key=full, **extra)
        upload_id = upload["UploadId"]
        try:
            parts = []
            view = memoryview(body)
            step = self.multipart_part_size
            for number, offset in enumerate(range(0, len(body), step), start=1):
                part = self._call(
                    "put",
                    key,
                    self._client.upload_part,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(view[offset : offset + step]),
                )
                parts.append({"ETag": part["ETag"], "PartNumber": number})
            condition = {"IfNoneMatch": "*"} if if_absent else {}
            self._call(
                "put",
                key,
                self._client.complete_multipart_upload,
                if_absent=if_absent,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **condition,
            )
        except BaseException:
            self._abort(full, upload_id)
            raise

    def _abort(self, full_key: str, upload_id: str) -> None:
        import botocore.exceptions as bce

        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except (bce.BotoCoreError, bce.ClientError):
            pass  # best effort: a lifecycle rule or prune removes stale uploads

    def get(self, key: str, start: int | None = None, length: int | None = None) -> bytes:
        if self._empty_read(key, start, length):
            return b""
        kwargs: dict[str, Any] = {}
        if start or length is not None:
            lo = start or 0
            kwargs["Range"] = f"bytes={lo}-" if length is None else f"bytes={lo}-{lo + length - 1}"
            # No checksum asked for: S3 sends none with a range, and a store that sends the whole object's
            # (Ceph's RGW before its fix) made every range a mismatch, read CHECKSUM_READS + 1 times.
            return self._get(key, start, length, **kwargs)
        for _ in range(CHECKSUM_READS):
            try:
                return self._get(key, start, length, ChecksumMode="ENABLED", **kwargs)
            except _ChecksumMismatch:
                continue  # cut short or garbled on the way: read again
        # Served so every time: what the storage holds does not match the checksum it keeps.  The bytes go to
        # the reader, which authenticates them and names the damage as on any other storage (the blobs of a
        # pack it reaches); failed as an outage, it was retried for the whole outage time, then said to be one.
        return self._get(key, start, length, **kwargs)

    def _get(self, key: str, start: int | None, length: int | None, **kwargs: Any) -> bytes:
        """One GET; _ChecksumMismatch where the body does not match the checksum S3 sends with it."""
        import botocore.exceptions as bce
        from botocore.httpchecksum import StreamingChecksumBody

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key, **kwargs)
        except bce.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # the range starts at or past the end of an existing object
            raise self._error(exc, "get", key) from None
        except bce.BotoCoreError as exc:
            raise self._error(exc, "get", key) from None
        body = response["Body"]
        checked = isinstance(body, StreamingChecksumBody)  # botocore reads it against S3's checksum
        try:
            data = body.read()
        except bce.FlexibleChecksumError:
            raise _ChecksumMismatch(key) from None
        except (bce.BotoCoreError, OSError) as exc:
            raise RemoteUnavailable(f"reading {self.display_url}{key} was cut short: {type(exc).__name__}") from None
        finally:
            body.close()
        expected = response.get("ContentLength")
        if expected is not None and len(data) != expected:
            raise RemoteUnavailable(f"reading {self.display_url}{key}: got {len(data)} of {expected} bytes")
        served = response.get("ContentRange")  # None where the whole object came (200) for the range asked
        if "Range" in kwargs and (served is not None or response["ResponseMetadata"].get("HTTPStatusCode") == 200):
            data = served_range(f"{self.display_url}{key}", start or 0, length, data, served)
        elif "Range" not in kwargs and not checked and key.startswith(DATA_PREFIX):
            # No checksum came (an object uploaded in parts, or written without one, or a store that keeps
            # none), and the Content-Length of a body cut short on the way may have been set to match it: the
            # object's size decides.  Taken as the object, a pack read whole by `check --read-data` was
            # reported damaged, its blobs past the cut lost, with `repair packs` advised.  Packs alone: the
            # other objects are small and read at every open (a lock each, a fleet's thousand), where a store
            # that keeps no checksum paid a HEAD apiece, and a cut one does not authenticate.
            info = self.stat(key)
            if info is None:
                raise ObjectNotFound(key)
            if info.size != len(data):
                raise RemoteUnavailable(f"reading {self.display_url}{key}: got {len(data)} of the {info.size} "
                                        "bytes the object holds")
        return data

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        import botocore.exceptions as bce

        paginator = self._client.get_paginator("list_objects_v2")
        skip = len(self.prefix)
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for item in page.get("Contents", ()):
                    key = item["Key"][skip:]
                    if not is_key(key):
                        continue  # not ours (e.g. a console's folder marker)
                    modified = item.get("LastModified")
                    yield ObjectInfo(key, int(item["Size"]), item.get("ETag") or None,
                                     modified.timestamp() if modified is not None else None)
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._error(exc, "list", None, where=prefix) from None

    def delete(self, key: str) -> None:
        validate_key(key)
        self._call("delete", key, self._client.delete_object, Key=self.prefix + key)

    def stat(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        try:
            head = self._call("stat", key, self._client.head_object, Key=self.prefix + key)
        except ObjectNotFound:
            return None
        return ObjectInfo(key, int(head["ContentLength"]))

    def enclosing_repository(self) -> str | None:
        parts = self.prefix.rstrip("/").split("/") if self.prefix else []
        for depth in range(len(parts) - 1, -1, -1):
            above = "".join(p + "/" for p in parts[:depth])
            try:
                self._call("stat", above + "config", self._client.head_object, Key=above + "config")
            except ObjectNotFound:
                continue
            except RemoteUnavailable:
                raise
            except RemoteError:  # not ours to look at (a policy granting this prefix only): cannot tell
                return None
            return f"s3://{self.bucket}/{above}"
        return None

    def cleanup_temp(self, older_than: float = 3600.0) -> int:
        """Abort multipart uploads begun more than ``older_than`` seconds ago: a process killed mid-upload
        leaves its parts stored, and billed, invisible to listings, until they are aborted."""
        import botocore.exceptions as bce

        cutoff = time.time() - older_than
        stale = []
        try:
            for page in self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                       Prefix=self.prefix):
                for upload in page.get("Uploads", ()):
                    key = upload["Key"][len(self.prefix):]
                    try:
                        validate_key(key)
                    except UsageError:
                        continue
                    if not key.startswith(LARGE_OBJECT_PREFIXES):  # another tool's, in a bucket shared at its root
                        continue
                    if upload["Initiated"].timestamp() < cutoff:
                        stale.append((upload["Key"], upload["UploadId"]))
        except (bce.BotoCoreError, bce.ClientError) as exc:
            raise self._error(exc, "list of unfinished uploads", None) from None
        removed = 0
        for full_key, upload_id in stale:
            try:
                self._call("abort of the upload of", full_key[len(self.prefix):],
                           self._client.abort_multipart_upload, Key=full_key, UploadId=upload_id)
            except ObjectNotFound:
                continue  # finished or aborted meanwhile
            removed += 1
        return removed

    def storage_class(self, key: str) -> str:
        """The storage class S3 reports for an object (STANDARD when it reports none)."""
        validate_key(key)
        head = self._call("stat", key, self._client.head_object, Key=self.prefix + key)
        return head.get("StorageClass") or "STANDARD"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()
