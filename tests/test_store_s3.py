"""The store over S3 (moto as a real HTTP server): backup, restore, check, two writers at once."""
import os
import subprocess
import sys

from chunkvault import Repository
from servers_s3 import moto_s3, s3_bucket, s3_bucket_factory  # noqa: F401
from treeutil import describe


def make_tree(root, seed):
    root.mkdir()
    rnd = __import__("random").Random(seed)
    for i in range(5):
        (root / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 400_000)))
    (root / "shared").write_bytes(__import__("random").Random(0).randbytes(600_000))


def test_backup_restore_check_over_s3(tmp_path, s3_bucket, monkeypatch, password):
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    make_tree(src, 1)
    repo = Repository.init(s3_bucket.url, password, kdf_seconds=0, pack_size=200_000, **s3_bucket.options)
    repo.backup([str(src)])
    (src / "f1").write_bytes(b"changed")
    repo.backup([str(src)])
    repo.close()
    repo = Repository.open(s3_bucket.url, password, **s3_bucket.options)
    snaps = repo.snapshots()
    assert [s.kind for s in snaps] == ["full", "diff"]
    out = tmp_path / "out"
    repo.restore("latest", str(out))
    assert describe(out) == describe(src)
    assert repo.check(read_data=True).ok


def test_a_prefix_of_any_text_s3_takes_holds_a_repository(tmp_path, s3_bucket_factory, moto_s3, password):
    """A bucket laid out by host names (``backups/Host A/``) or in another script than ASCII holds a
    repository below such a prefix, as restic's do: the URL was refused as an invalid prefix (exit 2)."""
    bucket = s3_bucket_factory(prefix="backups/Host A/ü")
    src = tmp_path / "src"
    make_tree(src, 5)
    Repository.init(bucket.url, password, kdf_seconds=0, **bucket.options).close()
    with Repository.open(bucket.url, password, cache=False, **bucket.options) as repo:
        repo.backup([str(src)])
        repo.restore("latest", str(tmp_path / "out"))
        assert repo.check(read_data=True).ok
    assert describe(tmp_path / "out") == describe(src)
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket.name)["Contents"]]
    assert "backups/Host A/ü/config" in keys and all(k.startswith("backups/Host A/ü/") for k in keys)


def test_two_clients_back_up_at_once(tmp_path, s3_bucket, password):
    env = {**os.environ, **s3_bucket.env, "CHUNKVAULT_PASSWORD": password,
           "CHUNKVAULT_CACHE_DIR": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "chunkvault.cli", "init", "-r", s3_bucket.url, "--kdf-time", "0",
                    "--pack-size", "100k"], env=env, check=True, capture_output=True)
    for name in ("a", "b"):
        make_tree(tmp_path / name, ord(name))
    procs = [subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "backup", "-r", s3_bucket.url,
                               str(tmp_path / name), "--host", name], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    repo = Repository.open(s3_bucket.url, password, **s3_bucket.options)
    snaps = repo.snapshots()
    assert sorted(s.host for s in snaps) == ["a", "b"]
    assert repo.check(read_data=True).ok
    for s in snaps:
        out = tmp_path / f"out-{s.host}"
        repo.restore(s.id, str(out))
        assert describe(out) == describe(tmp_path / s.host)


def test_lifecycle_over_s3(tmp_path, s3_bucket, monkeypatch):
    from lifecycle_scenario import run_lifecycle

    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(tmp_path / "cache"))
    run_lifecycle(s3_bucket.url, tmp_path, **s3_bucket.options)


def test_cli_endpoint_and_storage_class_flags(tmp_path, s3_bucket, moto_s3, cli):
    env = {k: v for k, v in s3_bucket.env.items() if k != "AWS_ENDPOINT_URL"}
    env["CHUNKVAULT_CACHE_DIR"] = str(tmp_path / "cache")
    src = tmp_path / "src"
    make_tree(src, 3)
    flags = ["-r", s3_bucket.url, "--s3-endpoint", moto_s3.endpoint]
    cli("init", *flags, "--kdf-time", "0", "--s3-storage-class", "STANDARD_IA", env=env)
    cli("backup", *flags, "--s3-storage-class", "STANDARD_IA", str(src), env=env)
    client = moto_s3.client()
    classes = {}
    for obj in client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]:
        head = client.head_object(Bucket=s3_bucket.name, Key=obj["Key"])
        classes[obj["Key"].split("/")[1]] = head.get("StorageClass", "STANDARD")
    assert classes["data"] == "STANDARD_IA" and classes["snapshots"] == "STANDARD" and classes["config"] == "STANDARD"
    cli("restore", "-r", s3_bucket.url, "-o", f"s3.endpoint-url={moto_s3.endpoint}", "latest",
        "--target", str(tmp_path / "out"), env=env)
    assert describe(tmp_path / "out") == describe(src)


def test_no_repository_is_made_inside_another(s3_bucket, password):
    """`init s3://bkt/nest/snapshots` inside the repository `s3://bkt/nest` was accepted: the outer one then
    took the inner config for a damaged snapshot of its own, and advised forgetting it."""
    import pytest

    from chunkvault.errors import RepositoryExists

    Repository.init(s3_bucket.url, password, kdf_seconds=0, **s3_bucket.options).close()
    for below in ("/snapshots", "/data/ab/deeper"):
        with pytest.raises(RepositoryExists, match=f"lies inside the repository at {s3_bucket.url}/"):
            Repository.init(s3_bucket.url + below, password, kdf_seconds=0, **s3_bucket.options)
    Repository.init(s3_bucket.url + "-beside", password, kdf_seconds=0, **s3_bucket.options).close()


def test_a_repository_named_keys_below_a_prefix_is_no_lost_config_there(s3_bucket, password):
    """`init s3://bkt/p/keys`, then `init s3://bkt/p`: refused, as before, but the reason said a repository lost
    its config at p, and that removing keys/ there lets init run again, the inner repository with it."""
    import pytest

    from chunkvault.errors import RepositoryExists, RepositoryNotFound

    Repository.init(s3_bucket.url + "/p/keys", password, kdf_seconds=0, **s3_bucket.options).close()
    with pytest.raises(RepositoryExists, match=r"holds the repository at \S+/p/keys, whose objects"):
        Repository.init(s3_bucket.url + "/p", password, kdf_seconds=0, **s3_bucket.options)
    with pytest.raises(RepositoryNotFound, match=r"no repository at \S+/p/? \(another lies below it, at \S+/p/keys\)"):
        Repository.open(s3_bucket.url + "/p", password, **s3_bucket.options)


def test_the_cache_of_a_repository_no_command_used_for_a_month_is_removed(tmp_path, s3_bucket, monkeypatch, password):
    """Each repository's cache is a directory named by its URL: one deleted, moved to another URL, or a one-off
    copy's target kept its index and snapshot objects for ever, and nothing removed them.  A command marks its
    repository's directory used and removes those beside it no command used for 30 days; anything else in
    the cache directory is left alone."""
    import time

    cache = tmp_path / "cache"
    monkeypatch.setenv("CHUNKVAULT_CACHE_DIR", str(cache))
    src = tmp_path / "src"
    make_tree(src, 2)
    with Repository.init(s3_bucket.url, password, kdf_seconds=0, **s3_bucket.options) as repo:
        repo.backup([str(src)])
    [used] = [d for d in cache.iterdir() if d.is_dir() and d.name != "key-ahead"]
    old, recent = cache / ("0" * 24), cache / ("1" * 24)
    (old / "index").mkdir(parents=True)
    (old / "index" / ("a" * 64)).write_bytes(b"entry")
    recent.mkdir()
    month_ago = time.time() - 31 * 86400
    for directory in (old, used):
        os.utime(directory, (month_ago, month_ago))
    with Repository.open(s3_bucket.url, password, **s3_bucket.options) as repo:
        assert [s.kind for s in repo.snapshots()] == ["full"]
    assert not old.exists()
    assert used.is_dir() and recent.is_dir() and (cache / "key-ahead").is_dir()
    assert time.time() - used.stat().st_mtime < 86400  # marked used: kept another month
    # A directory holding anything else than the cache (a --cache-dir given where other files are): nothing goes.
    (cache / "notes").mkdir()
    for directory in (old, recent):
        directory.mkdir(exist_ok=True)
        os.utime(directory, (month_ago, month_ago))
    with Repository.open(s3_bucket.url, password, **s3_bucket.options) as repo:
        repo.snapshots()
    assert old.is_dir() and recent.is_dir()


def test_a_ranged_read_garbled_on_the_way_is_read_again(tmp_path, s3_bucket, password):
    """S3 sends no checksum with a ranged read (its checksum is the whole object's), so a body garbled on the
    way shows as a blob that does not authenticate: it is read once more, with a warning, before the stored
    one is called damaged.  A restore failed at once so (exit 13), on the first read of its manifest."""
    import io

    import pytest

    from chunkvault.errors import RemoteRetryWarning
    from chunkvault.remotes.s3 import S3Remote

    src = tmp_path / "src"
    make_tree(src, 3)
    Repository.init(s3_bucket.url, password, kdf_seconds=0, **s3_bucket.options).close()
    with Repository.open(s3_bucket.url, password, **s3_bucket.options) as repo:
        snap = repo.backup([str(src)]).snapshot
    with Repository.open(s3_bucket.url, password, cache=False, **s3_bucket.options) as repo:
        s3 = repo.store.remote
        while not isinstance(s3, S3Remote):
            s3 = s3.inner
        real = s3._client.get_object
        garbled: list[str] = []

        def garbling(**kw):
            response = real(**kw)
            if "Range" in kw and not garbled:
                body = bytearray(response["Body"].read())
                body[len(body) // 2] ^= 1
                garbled.append(kw["Key"])
                response["Body"] = io.BytesIO(bytes(body))
            return response

        s3._client.get_object = garbling
        with pytest.warns(RemoteRetryWarning, match="did not authenticate as first read, and did when read again"):
            repo.restore(snap.id, str(tmp_path / "out"))
        assert garbled
    assert describe(tmp_path / "out") == describe(src)


def test_damage_names_the_pack_it_was_read_from(tmp_path, s3_bucket, moto_s3, password):
    """A blob that does not authenticate, read again the same, is named with the object it was read from: the
    pack to put back (from the bucket's old versions, say).  The error named the blob and the file alone."""
    import pytest

    from chunkvault.errors import CorruptObject

    src = tmp_path / "src"
    make_tree(src, 4)
    Repository.init(s3_bucket.url, password, kdf_seconds=0, **s3_bucket.options).close()
    with Repository.open(s3_bucket.url, password, **s3_bucket.options) as repo:
        snap = repo.backup([str(src)]).snapshot
    client = moto_s3.client()
    packs = client.list_objects_v2(Bucket=s3_bucket.name, Prefix="repo/data/")["Contents"]
    pack = max(packs, key=lambda o: o["Size"])["Key"]
    body = bytearray(client.get_object(Bucket=s3_bucket.name, Key=pack)["Body"].read())
    body[len(body) // 2] ^= 1
    client.put_object(Bucket=s3_bucket.name, Key=pack, Body=bytes(body))
    with Repository.open(s3_bucket.url, password, cache=False, **s3_bucket.options) as repo:
        named = f"authentication failed .* \\(read from {pack.removeprefix('repo/')}\\)"
        with pytest.raises(CorruptObject, match=named):
            repo.restore(snap.id, str(tmp_path / "out"))
