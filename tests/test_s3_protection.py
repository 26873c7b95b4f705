"""Buckets that protect backups from deletion: versioning, Object Lock, credentials without s3:DeleteObject
(a bucket policy: moto enforces an explicit Deny), and objects a lifecycle rule moved to an archive class.
Against moto running as a real HTTP server (servers_s3.py)."""
from __future__ import annotations

import json
import os

import pytest

from conftest import PASSWORD
from servers_s3 import moto_s3, s3_bucket_factory  # noqa: F401
from walsegments import write_segment

PREFIXES = ("config", "keys/", "data/", "index/", "snapshots/", "wal/")


@pytest.fixture
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(100_000))
    return src


@pytest.fixture
def run(cli, tmp_path):
    """The CLI against a bucket's repository: ``run(bucket, "backup", path, check=0)``."""

    def go(bucket, *args, check=0, env=None):
        env = {**bucket.env, "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache"), "CHUNKVAULT_RETRY_TIME": "0",
               **(env or {})}
        return cli(args[0], "-r", bucket.url, *args[1:], env=env, check=check)

    return go


def _deny_delete(client, bucket, prefixes=("",)) -> None:
    """A bucket policy denying s3:DeleteObject under the repository's ``prefixes`` (moto evaluates Resource,
    not NotResource)."""
    resources = [f"arn:aws:s3:::{bucket.name}/{bucket.prefix}/{p}*" for p in prefixes]
    client.put_bucket_policy(Bucket=bucket.name, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteObject", "Resource": resources}]}))


def _locks(client, bucket) -> list[dict]:
    listed = client.list_objects_v2(Bucket=bucket.name, Prefix=f"{bucket.prefix}/locks/").get("Contents", [])
    return [json.loads(client.get_object(Bucket=bucket.name, Key=o["Key"])["Body"].read()) | {"key": o["Key"]}
            for o in listed]


def _as_another_host(client, bucket) -> None:
    """Every lock there rewritten as another machine's (fresh by the storage's clock: its pid means nothing)."""
    for lock in _locks(client, bucket):
        key = lock.pop("key")
        client.put_object(Bucket=bucket.name, Key=key, Body=json.dumps(lock | {"host": "elsewhere"}).encode())


def _versions(client, bucket) -> tuple[int, int]:
    got = client.list_object_versions(Bucket=bucket.name, Prefix=f"{bucket.prefix}/")
    return len(got.get("Versions", [])), len(got.get("DeleteMarkers", []))


@pytest.mark.slow
def test_versioned_bucket_every_command_works_and_prune_leaves_old_versions(run, moto_s3, s3_bucket_factory,
                                                                            source, tmp_path):
    client = moto_s3.client()
    bucket, offsite = s3_bucket_factory(), s3_bucket_factory()
    for b in (bucket, offsite):
        client.put_bucket_versioning(Bucket=b.name, VersioningConfiguration={"Status": "Enabled"})
        run(b, "init")
    run(bucket, "backup", str(source))
    (source / "f0").write_bytes(os.urandom(100_000))
    run(bucket, "backup", str(source), "--type", "full")
    run(bucket, "config", "set", "compression", "5")  # the config rewritten: its current version is read
    assert "compression     5" in run(bucket, "config").stdout.decode()
    run(bucket, "forget", "--keep-last", "1", "--prune")
    _, markers = _versions(client, bucket)
    assert markers > 0  # what prune deleted is hidden, not gone: the space comes back with a lifecycle rule
    run(bucket, "check", "--read-data")
    run(bucket, "copy", "--to", offsite.url, env={"CHUNKVAULT_TO_PASSWORD": PASSWORD})
    run(offsite, "check", "--read-data")
    run(bucket, "restore", "latest", "--target", str(tmp_path / "out"))
    assert (tmp_path / "out" / "f0").read_bytes() == (source / "f0").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["GOVERNANCE", "COMPLIANCE"])
def test_object_lock_prune_hides_packs_that_stay_stored(run, moto_s3, s3_bucket_factory, source, tmp_path, mode):
    """S3 answers a delete without a version id with a delete marker, retention or not: every command works,
    and a locked version cannot be deleted until its retention ends."""
    client = moto_s3.client()
    bucket = s3_bucket_factory()
    client.delete_bucket(Bucket=bucket.name)
    client.create_bucket(Bucket=bucket.name, ObjectLockEnabledForBucket=True)
    client.put_object_lock_configuration(Bucket=bucket.name, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": mode, "Days": 1}}})
    run(bucket, "init")
    run(bucket, "backup", str(source))
    (source / "f1").write_bytes(os.urandom(100_000))
    run(bucket, "backup", str(source), "--type", "full")
    run(bucket, "forget", "--keep-last", "1", "--prune")
    assert not _locks(client, bucket)
    run(bucket, "check", "--read-data")
    run(bucket, "restore", "latest", "--target", str(tmp_path / "out"))
    assert (tmp_path / "out" / "f1").read_bytes() == (source / "f1").read_bytes()
    hidden = client.list_object_versions(Bucket=bucket.name, Prefix=f"{bucket.prefix}/data/")["Versions"]
    hidden = [v for v in hidden if not v["IsLatest"]] or hidden
    with pytest.raises(client.exceptions.ClientError, match="AccessDenied"):
        client.delete_object(Bucket=bucket.name, Key=hidden[0]["Key"], VersionId=hidden[0]["VersionId"])


def _with_prune_work(run, bucket, source) -> None:
    """A repository of two fulls, the first forgotten: a prune has a pack to delete."""
    run(bucket, "init")
    run(bucket, "backup", str(source))
    (source / "f2").write_bytes(os.urandom(100_000))
    run(bucket, "backup", str(source), "--type", "full")
    run(bucket, "forget", "--keep-last", "1")


def test_a_prune_that_may_not_delete_index_objects_is_refused_before_it_writes(run, moto_s3, s3_bucket_factory,
                                                                               source):
    """Only a delete under data/ was tried first: with deletes denied under index/ alone, a prune wrote its
    repack and its new index, deleted the packs, then failed at the old index objects (exit 14)."""
    client = moto_s3.client()
    bucket = s3_bucket_factory()
    _with_prune_work(run, bucket, source)
    _deny_delete(client, bucket, ("index/",))
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket.name, Prefix=bucket.prefix)["Contents"]
              if "/locks/" not in o["Key"]}
    err = run(bucket, "prune", "--max-unused", "0", check=14).stderr.decode()
    assert "prune deletes objects" in err and "does not allow it" in err and len(err.splitlines()) == 1
    assert {o["Key"] for o in client.list_objects_v2(Bucket=bucket.name, Prefix=bucket.prefix)["Contents"]
            if "/locks/" not in o["Key"]} == listed
    run(bucket, "check", "--read-data")


@pytest.mark.slow
def test_credentials_that_may_not_delete_back_up_and_leave_their_locks_released(run, moto_s3, s3_bucket_factory,
                                                                                source, tmp_path):
    """A lock its command could not delete stayed live for 5 minutes: another host's prune was held off by
    each backup, and a refused prune's exclusive lock held every other host's backup off."""
    client = moto_s3.client()
    bucket = s3_bucket_factory()
    _with_prune_work(run, bucket, source)
    _deny_delete(client, bucket)
    run(bucket, "backup", str(source))
    wal = write_segment(tmp_path, "000000010000000000000001", size=1 << 20)
    run(bucket, "archive-push", str(wal))  # a database's archive_command with such credentials
    run(bucket, "check")
    run(bucket, "restore", "latest", "--target", str(tmp_path / "out"))
    err = run(bucket, "prune", check=14).stderr.decode()
    assert "prune deletes objects" in err and "does not allow it" in err and len(err.splitlines()) == 1
    err = run(bucket, "forget", "--keep-last", "1", check=14).stderr.decode()
    assert "forget deletes objects" in err
    locks = _locks(client, bucket)
    assert {lk["purpose"] for lk in locks} == {"backup", "archive-push", "check", "restore", "prune", "forget"}
    assert all(lk.get("released") is True for lk in locks)
    _as_another_host(client, bucket)
    run(bucket, "backup", str(source))  # the refused prune's and forget's exclusive locks hold nothing off
    client.delete_bucket_policy(Bucket=bucket.name)  # the trusted machine, with full credentials
    _as_another_host(client, bucket)
    run(bucket, "forget", "--keep-last", "1", "--prune")
    assert not _locks(client, bucket)
    run(bucket, "check", "--read-data")


def test_a_backup_that_may_not_delete_its_lock_says_who_holds_the_repository(run, moto_s3, s3_bucket_factory,
                                                                             source):
    """Backing off from another host's exclusive lock, a backup deletes its own first: refused, it failed
    with exit 14 naming its own lock, not the prune it met."""
    client = moto_s3.client()
    bucket = s3_bucket_factory()
    run(bucket, "init")
    _deny_delete(client, bucket)
    client.put_object(Bucket=bucket.name, Key=f"{bucket.prefix}/locks/x-{'ab' * 16}", Body=json.dumps(
        {"kind": "exclusive", "host": "elsewhere", "pid": 4242, "purpose": "prune", "time": 0}).encode())
    err = run(bucket, "backup", str(source), "--wait", "1", check=15).stderr.decode()
    assert "locked by prune on elsewhere" in err
    mine = [lk for lk in _locks(client, bucket) if lk["purpose"] == "backup"]
    assert len(mine) == 1 and mine[0]["released"] is True


def test_a_password_change_that_may_not_delete_the_old_key_is_refused_before_it_adds_one(run, cli, moto_s3,
                                                                                     s3_bucket_factory, tmp_path):
    """It stored the new key, was denied the old one's deletion and its own key's taking back, and said the old
    password "may no longer open", exit 14: both passwords opened, and each try added one more key."""
    client = moto_s3.client()
    bucket = s3_bucket_factory()
    run(bucket, "init")
    keys = lambda: sorted(o["Key"] for o in client.list_objects_v2(  # noqa: E731
        Bucket=bucket.name, Prefix=f"{bucket.prefix}/keys/").get("Contents", []))
    before = keys()
    _deny_delete(client, bucket, ("keys/",))
    (tmp_path / "new").write_text("new password\n")
    for _ in range(2):
        err = cli("key", "passwd", "-r", bucket.url, "--new-password-file", str(tmp_path / "new"), "--kdf-time",
                  "0", env={**bucket.env, "CHUNKVAULT_RETRY_TIME": "0"}, check=14).stderr.decode()
        assert len(err.splitlines()) == 1 and "key passwd deletes objects" in err, err
        assert err.rstrip().endswith("the password is unchanged") and keys() == before
    run(bucket, "snapshots")
    run(bucket, "snapshots", env={"CHUNKVAULT_PASSWORD": "new password"}, check=11)


@pytest.mark.slow
def test_credentials_that_may_delete_only_locks(run, moto_s3, s3_bucket_factory, source, tmp_path):
    """The setup to recommend: deleting allowed under locks/ only; nothing is left behind, and what deletes
    backups is refused before it takes a lock."""
    client = moto_s3.client()
    bucket = s3_bucket_factory()
    _with_prune_work(run, bucket, source)
    _deny_delete(client, bucket, PREFIXES)
    run(bucket, "backup", str(source))
    wal = write_segment(tmp_path, "000000010000000000000001", size=1 << 20)
    run(bucket, "archive-push", str(wal))
    assert not _locks(client, bucket)
    assert "prune deletes objects" in run(bucket, "prune", check=14).stderr.decode()
    assert "forget deletes objects" in run(bucket, "forget", "--keep-last", "1", check=14).stderr.decode()
    assert not _locks(client, bucket)
    run(bucket, "check", "--read-data")


def test_packs_in_an_archive_class_are_named_with_what_brings_them_back(run, moto_s3, s3_bucket_factory, source,
                                                                       tmp_path):
    """A lifecycle rule moved the data packs to DEEP_ARCHIVE: check advised `repair packs` and forgetting the
    snapshots, for data an S3 restore brings back whole."""
    client = moto_s3.client()
    bucket = s3_bucket_factory()
    run(bucket, "init")
    run(bucket, "backup", str(source))
    for o in client.list_objects_v2(Bucket=bucket.name, Prefix=f"{bucket.prefix}/data/")["Contents"]:
        client.copy_object(Bucket=bucket.name, Key=o["Key"], CopySource={"Bucket": bucket.name, "Key": o["Key"]},
                           StorageClass="DEEP_ARCHIVE")
    proc = run(bucket, "check", check=18)
    out = proc.stdout.decode()
    assert "archive storage class" in out and "repair" not in out and "forget" not in out
    err = run(bucket, "restore", "latest", "--target", str(tmp_path / "out"), check=14).stderr.decode()
    assert "archive storage class" in err and "RestoreObject" in err
