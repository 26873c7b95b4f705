"""check finds every kind of damage and names what it affects."""
import json
import os

import pytest
from hypothesis import given, strategies as st

from chunkvault import Repository


@pytest.fixture
def repo_with_data(tmp_path, new_repo):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(1_500_000))
    (src / "b").write_bytes(os.urandom(300_000))
    repo = new_repo(str(tmp_path / "repo"), pack_size=256 * 1024)
    s1 = repo.backup([str(src)]).snapshot
    (src / "c").write_bytes(os.urandom(200_000))
    s2 = repo.backup([str(src)]).snapshot
    return tmp_path / "repo", repo, s1, s2


def packs(repo_dir):
    return sorted(p for p in (repo_dir / "data").rglob("*") if p.is_file())


def test_clean_repository(repo_with_data):
    _, repo, _, _ = repo_with_data
    r = repo.check()
    assert r.ok and r.snapshots == 2 and r.packs >= 2
    r = repo.check(read_data=True)
    assert r.ok and r.blobs_read == r.blobs and r.packs_read == r.packs


def test_each_index_object_is_read_once(repo_with_data, password, monkeypatch):
    """check makes the repository's index from the index objects it reads itself: on a remote each
    read is a round trip, and a large index decoded twice is held twice."""
    from collections import Counter

    from chunkvault.remotes.local import LocalRemote

    repo_dir, _, _, _ = repo_with_data
    names = sorted(p.name for p in (repo_dir / "index").iterdir())
    assert len(names) >= 2
    gets: Counter[str] = Counter()
    real_get = LocalRemote.get
    monkeypatch.setattr(LocalRemote, "get", lambda self, key, *a: gets.update([key]) or real_get(self, key, *a))
    r = Repository.open(str(repo_dir), password).check()
    assert r.ok and r.blobs > 0
    assert {k: n for k, n in gets.items() if k.startswith("index/")} == {f"index/{n}": 1 for n in names}


def test_subsets_cover_everything_once(repo_with_data):
    _, repo, _, _ = repo_with_data
    total = sum(repo.check(subset=f"{n}/3").packs_read for n in (1, 2, 3))
    assert total == repo.check().packs


def test_flipped_blob_found_by_read_data_and_attributed(repo_with_data, password):
    repo_dir, _, s1, s2 = repo_with_data
    victim = packs(repo_dir)[0]
    data = bytearray(victim.read_bytes())
    data[40] ^= 1
    victim.write_bytes(bytes(data))
    repo = Repository.open(str(repo_dir), password)
    assert not any("blob" in p.object for p in repo.check().problems)  # structure alone cannot see it...
    r = repo.check(read_data=True)
    assert not r.ok
    # ...the name check on the pack and the blob itself both flag it
    named = {p.object for p in r.problems}
    assert f"data/{victim.parent.name}/{victim.name}" in named or any(o.startswith("blob ") for o in named)
    affected = {s for p in r.problems for s in p.snapshots}
    assert affected & {s1.id, s2.id}


def test_missing_pack_names_snapshots_and_files(repo_with_data, password):
    repo_dir, _, s1, s2 = repo_with_data
    victim = max(packs(repo_dir), key=lambda p: p.stat().st_size)
    os.remove(victim)
    r = Repository.open(str(repo_dir), password).check()
    missing = [p for p in r.problems if p.problem.startswith("pack is missing (`repair index`")]
    assert len(missing) == 1 and victim.name in missing[0].object
    assert missing[0].snapshots and missing[0].files


def test_missing_parent_snapshot(repo_with_data, password):
    repo_dir, _, s1, s2 = repo_with_data
    os.remove(repo_dir / "snapshots" / s1.id)
    r = Repository.open(str(repo_dir), password).check()
    assert any(s2.id in p.object and "chain" in p.problem for p in r.problems)


def test_cli_check_exit_codes(repo_with_data, cli):
    repo_dir, _, _, _ = repo_with_data
    cli("check", "-r", str(repo_dir), "--read-data")
    os.remove(packs(repo_dir)[0])
    proc = cli("check", "-r", str(repo_dir), "--json", check=18)
    import json

    report = json.loads(proc.stdout)
    assert not report["ok"] and report["problems"]
    assert cli("check", "-r", str(repo_dir), "--read-data-subset", "4/3", check=2).returncode == 2


def test_repair_index_from_pack_headers(repo_with_data, password, tmp_path):
    repo_dir, _, s1, s2 = repo_with_data
    for p in (repo_dir / "index").iterdir():
        p.unlink()
    repo = Repository.open(str(repo_dir), password)
    assert not repo.check().ok
    report = repo.repair_index()
    assert report.packs >= 2 and not report.unreadable_packs
    assert repo.check(read_data=True).ok
    repo.restore(s2.id, str(tmp_path / "out"))


def test_repair_snapshots_drops_damaged_files_only_when_confirmed(repo_with_data, password, cli, tmp_path):
    repo_dir, _, s1, s2 = repo_with_data
    victim = max(packs(repo_dir), key=lambda p: p.stat().st_size)
    os.remove(victim)
    dry = json.loads(cli("repair", "-r", str(repo_dir), "snapshots", "--json").stdout)
    assert dry["dropped"] and not dry["rewritten"]
    cli("repair", "-r", str(repo_dir), "index")  # the index forgets the lost pack
    dry = json.loads(cli("repair", "-r", str(repo_dir), "snapshots", "--json").stdout)
    assert dry["dropped"] and not dry["rewritten"]
    out = json.loads(cli("repair", "-r", str(repo_dir), "snapshots", "--confirm", "REPAIR", "--json").stdout)
    assert out["rewritten"]
    dropped = {(d["snapshot"], d["path"]) for d in out["dropped"]}
    repo = Repository.open(str(repo_dir), password)
    assert repo.check().ok
    for snap in repo.snapshots():
        target = tmp_path / f"r-{snap.id[:8]}"
        repo.restore(snap.id, str(target))
        restored = {p.name for p in target.iterdir()}
        assert not {p for s, p in dropped if s == snap.id} & restored


@pytest.mark.parametrize("window, cheap_ranges", [(1, True), (5_000, True), (4 << 20, True), (1, False)])
def test_read_data_in_windows_smaller_than_a_pack(repo_with_data, password, monkeypatch, window, cheap_ranges):
    """A pack read window by window (or, where a ranged read is a round trip, whole in one request):
    every blob opened, every byte hashed once; damage in a blob, in the header or in the trailer is
    still the pack's bytes not matching its name, and only a damaged blob is lost (with the header or
    trailer damaged, the index says where each blob lies and every one verifies)."""
    from chunkvault.remotes.local import LocalRemote
    from chunkvault.store import check

    monkeypatch.setattr(check, "PACK_READ_WINDOW", window)
    monkeypatch.setattr(LocalRemote, "cheap_ranges", cheap_ranges)
    gets = []
    real_get = LocalRemote.get
    monkeypatch.setattr(LocalRemote, "get", lambda self, key, *a: gets.append((key, a)) or real_get(self, key, *a))
    repo_dir, repo, _, _ = repo_with_data
    r = repo.check(read_data=True)
    assert r.ok and r.blobs_read == r.blobs and r.packs_read == r.packs
    assert r.bytes_read == sum(p.stat().st_size for p in packs(repo_dir))
    whole = sum(1 for key, a in gets if key.startswith("data/") and not a)
    assert whole == (0 if cheap_ranges else r.packs)  # ranges, or one request per pack
    victim = max(packs(repo_dir), key=lambda p: p.stat().st_size)
    good = victim.read_bytes()
    name = f"data/{victim.parent.name}/{victim.name}"
    for at, in_blob in ((len(good) // 2, True), (len(good) - 20, False), (len(good) - 3, False)):
        bad = bytearray(good)  # a blob, the sealed header, the trailer
        bad[at] ^= 0x40
        victim.write_bytes(bytes(bad))
        r = Repository.open(str(repo_dir), password).check(read_data=True)
        assert [p.problem for p in r.problems if p.object == name] == [
            f"content does not match its name (`repair packs {victim.name[:12]}` keeps what of it still verifies)"]
        assert (r.blobs_read == r.blobs - 1) == in_blob and (r.blobs_read == r.blobs) != in_blob
        assert any(p.snapshots for p in r.problems) == in_blob
    victim.write_bytes(good)
    assert Repository.open(str(repo_dir), password).check(read_data=True).ok


@pytest.mark.parametrize("cheap_ranges", [True, False])
def test_plain_check_reads_a_pack_whose_header_is_damaged(repo_with_data, password, monkeypatch, cheap_ranges):
    """A damaged pack header says nothing of the blobs (a restore finds them by the index): a check without
    --read-data reads that one pack and names only the snapshots and files the damage reaches, as
    --read-data does, where it named every snapshot holding any of the pack's blobs."""
    from chunkvault.remotes.local import LocalRemote

    monkeypatch.setattr(LocalRemote, "cheap_ranges", cheap_ranges)
    repo_dir, _, _, _ = repo_with_data
    victim = max(packs(repo_dir), key=lambda p: p.stat().st_size)
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[len(good) - 20] ^= 0x40  # the sealed header
    victim.write_bytes(bytes(bad))

    def outcome(**kw):
        r = Repository.open(str(repo_dir), password, ledger=False).check(**kw)
        return r, [(p.object, p.problem, sorted(p.snapshots), sorted(p.files)) for p in r.problems]

    r, found = outcome()
    assert found == [(f"data/{victim.parent.name}/{victim.name}", "content does not match its name "
                      f"(`repair packs {victim.name[:12]}` keeps what of it still verifies)", [], [])]
    assert r.packs_read == 1 and 0 < r.blobs_read < r.blobs
    bad[len(good) // 2] ^= 0x40  # and a blob
    victim.write_bytes(bytes(bad))
    r, found = outcome()
    assert len(found) == 2 and found[1][2] and found[1][3]
    assert found == outcome(read_data=True)[1]


def test_forked_read_data_reports_what_threads_report(repo_with_data, password, monkeypatch):
    """Large checks on local disk read packs in one forked worker per core: their problems, the blobs
    each names, and the snapshots and files those take down come back exactly as the threads' do."""
    from chunkvault.store import check as check_module, forked

    repo_dir, _, s1, s2 = repo_with_data
    largest = max(packs(repo_dir), key=lambda p: p.stat().st_size)
    for victim, at in ((largest, largest.stat().st_size // 2), (packs(repo_dir)[-1], -30)):
        data = bytearray(victim.read_bytes())
        data[at] ^= 1
        victim.write_bytes(bytes(data))
    for lost in packs(repo_dir):  # a pack of file data only: losing one holding a manifest hides the bad blob's owners
        if lost == largest:
            continue
        kept = lost.read_bytes()
        os.remove(lost)
        problems = Repository.open(str(repo_dir), password, ledger=False).check().problems
        if not any("manifest unreadable" in p.problem for p in problems):
            break
        lost.write_bytes(kept)
    repo = Repository.open(str(repo_dir), password, ledger=False)

    def report(forking: bool) -> tuple:
        monkeypatch.setattr(check_module, "FORK_MIN_BYTES", 0 if forking else 1 << 62)
        monkeypatch.setattr(forked, "cores", lambda: 2)
        forks = []
        real = forked.Workers.__init__
        monkeypatch.setattr(forked.Workers, "__init__", lambda w, n, work: (forks.append(n), real(w, n, work))[1])
        calls = []
        r = repo.check(read_data=True, progress=lambda *a: calls.append(a))
        assert forks == ([2] if forking else []) and calls[-1][1] == r.bytes_read
        problems = sorted((p.object, p.problem, sorted(p.snapshots), sorted(p.files)) for p in r.problems)
        return problems, r.packs_read, r.blobs_read, r.bytes_read

    threads, forks = report(False), report(True)
    assert forks == threads
    assert any(p[0].startswith("blob ") and p[2] for p in forks[0])  # a bad blob, attributed to snapshots
    assert any(p[1].startswith("pack is missing") for p in forks[0])


def test_read_data_whose_workers_cannot_start_reads_the_packs_in_its_own_process(repo_with_data, monkeypatch):
    """Under a low limit (open files, processes) the workers do not start: the check reads every pack itself,
    with a warning naming the limit, where it ended with that error and checked no pack."""
    from chunkvault.store import check as check_module, forked

    _, repo, _, _ = repo_with_data
    whole = repo.check(read_data=True)
    monkeypatch.setattr(check_module, "FORK_MIN_BYTES", 0)
    monkeypatch.setattr(forked, "cores", lambda: 2)

    def cannot_start(self, n, work):
        raise forked.WorkersNotStarted("could not start worker process 2 of 2 (Too many open files); none is left "
                                       "running: raise the limit (ulimit -n, LimitNOFILE=)")

    monkeypatch.setattr(forked.Workers, "__init__", cannot_start)
    r = repo.check(read_data=True)
    assert r.ok and (r.packs_read, r.blobs_read, r.bytes_read) == (whole.packs_read, whole.blobs_read,
                                                                  whole.bytes_read) and r.packs_read > 0
    assert r.warnings == ["could not start worker process 2 of 2 (Too many open files); none is left running: "
                          "raise the limit (ulimit -n, LimitNOFILE=); the packs were read in this process instead"]


def test_a_backup_saved_while_check_loads_the_repository_is_no_problem(repo_with_data, password, monkeypatch,
                                                                       tmp_path):
    """Backups and check both take a shared lock: one that saves its snapshot between check's reading of the
    index and of the snapshots made check report its manifest as in no index (exit 18)."""
    from chunkvault.store.check import Checker

    repo_dir, repo, _, _ = repo_with_data
    (tmp_path / "src" / "new").write_bytes(os.urandom(10_000))
    steps: list[str] = []

    def then_a_backup(name):
        real = getattr(Checker, name)

        def step(self, *args):
            out = real(self, *args)
            steps.append(name)
            if len(steps) == 1:
                with Repository.open(str(repo_dir), password, ledger=False) as other:
                    other.backup([str(tmp_path / "src")])
            return out

        monkeypatch.setattr(Checker, name, step)

    then_a_backup("_load_index")
    then_a_backup("_load_snapshots")
    with Repository.open(str(repo_dir), password, ledger=False) as checking:
        report = checking.check()
    assert len(steps) == 2 and report.ok, report.problems


def test_check_read_data_told_to_stop_reads_no_more_packs(tmp_path, new_repo):
    """Ctrl-C printed "interrupted" at once, then the pack thread went on reading every pack left (minutes on
    a slow link, ten on a stalled one) while the process waited for it to exit."""
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "src"
    src.mkdir()
    for i in range(16):
        (src / f"f{i}").write_bytes(os.urandom(1 << 20))
    repo = new_repo(str(tmp_path / "repo"), pack_size=512 * 1024)
    repo.backup([str(src)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")}
    env["CHUNKVAULT_PASSWORD"] = "correct horse battery staple"
    check = subprocess.Popen([sys.executable, "-m", "chunkvault.cli", "check", "-r", str(tmp_path / "repo"),
                              "--read-data", "--limit-download", "256"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2)
    check.send_signal(signal.SIGINT)
    try:  # the packs in hand, a few seconds at 256 KiB/s; reading all 16 MiB would take a minute more
        _, err = check.communicate(timeout=30)
    finally:
        check.kill()
    assert check.returncode == 130 and err.decode().strip() == "chunkvault: interrupted", err


@pytest.mark.filterwarnings("ignore::chunkvault.ledger.RepositoryStateWarning")
def test_a_differential_whose_parent_object_is_damaged_is_not_told_its_parent_is_missing(tmp_path, new_repo,
                                                                                        password):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"one")
    repo = new_repo(str(tmp_path / "repo"))
    full = repo.backup([str(src)]).snapshot
    (src / "f").write_bytes(b"two")
    diff = repo.backup([str(src)]).snapshot
    assert diff.parent == full.id
    obj = tmp_path / "repo" / "snapshots" / full.id
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 1
    obj.write_bytes(bytes(data))
    report = Repository.open(str(tmp_path / "repo"), password).check()
    said = {p.object: p.problem for p in report.problems}
    assert said[f"snapshots/{diff.id}"] == (f"chain does not resolve: snapshot {full.id[:8]} of its chain does "
                                            f"not load (see snapshots/{full.id})")


def test_a_file_in_no_index_whose_header_does_not_read_is_not_sent_to_repair_index(tmp_path, new_repo, password):
    """`repair index` cannot add it: check said it would, and said so again after every `repair index`."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    repo = new_repo(str(tmp_path / "repo"))
    repo.backup([str(src)])
    garbage = os.urandom(5000)
    import blake3

    name = blake3.blake3(garbage).hexdigest()
    (tmp_path / "repo" / "data" / name[:2]).mkdir(exist_ok=True)
    (tmp_path / "repo" / "data" / name[:2] / name).write_bytes(garbage)
    repo = Repository.open(str(tmp_path / "repo"), password)
    for _ in range(2):
        (said,) = [w for w in repo.check().warnings if name in w]
        assert "its header does not read" in said and "`repair index` adds it" not in said
        repo.repair_index()


def test_a_stray_file_among_the_index_objects_is_named_as_one_among_the_packs_is(repo_with_data, password):
    root = repo_with_data[0]
    (root / "index" / "notes.txt").write_text("left here")
    (said,) = [w for w in Repository.open(str(root), password).check().warnings if "notes.txt" in w]
    assert said == "unexpected object index/notes.txt (no index object is kept under that name)"


def _indexed_packs(store):
    """The index object names, and pack id -> entries as they list them."""
    from chunkvault.store.indexfile import decode_index

    names = store.index_names()
    packs = {}
    for n in names:
        packs.update(decode_index(store.sealer, store.remote.get(f"index/{n}"), n).packs)
    return names, packs


def test_a_pack_whose_header_and_index_disagree_is_named_with_the_way_on(repo_with_data, password, cli):
    """Indexed in part (a repair left out its blobs that did not verify): the problem said only that they
    disagree; `repair packs` is what makes it whole."""
    from chunkvault.store.indexfile import IndexData
    from chunkvault.store.repository import pack_key

    root, repo, _s1, _s2 = repo_with_data
    store = repo.store
    names, packs = _indexed_packs(store)
    pid = max(packs, key=lambda p: len(packs[p]))
    packs[pid] = packs[pid][1:]
    store.write_index(IndexData(packs=packs, supersedes=[bytes.fromhex(n) for n in names]))
    said = {p.object: p.problem for p in Repository.open(str(root), password).check().problems}
    assert said[pack_key(pid)] == (f"pack header and index disagree (1 blob(s) its header lists are not indexed "
                                   f"so, 0 indexed here are not in its header): `repair packs {pid.hex()[:12]}` "
                                   "keeps what of it verifies")
    done = cli("repair", "-r", str(root), "packs", pid.hex()[:12], "--confirm", "REPAIR").stdout.decode()
    assert "0 lost" in done and "packs replaced: no blob was lost" in done  # not sent to `repair snapshots`
    assert Repository.open(str(root), password).check(read_data=True).ok


def test_an_index_listing_a_packs_entries_in_another_order_agrees_with_its_header(repo_with_data, password):
    """A check compares the index's bytes for a pack with its header's first, and decodes both only where
    they differ: entries listed in another order (as another writer may index them) still agree."""
    from chunkvault.store.indexfile import IndexData

    root, repo, _s1, _s2 = repo_with_data
    store = repo.store
    names, packs = _indexed_packs(store)
    pid = max(packs, key=lambda p: len(packs[p]))
    assert len(packs[pid]) > 1
    packs[pid] = packs[pid][::-1]
    store.write_index(IndexData(packs=packs, supersedes=[bytes.fromhex(n) for n in names]))
    report = Repository.open(str(root), password).check()
    assert report.ok, report.problems


def test_a_damaged_key_file_is_named_with_what_removes_it(repo_with_data, password):
    """A second key file damaged said only "content does not match its name"."""
    repo_dir, repo, _, _ = repo_with_data
    other = repo.add_key("another password", kdf_seconds=0)
    path = repo_dir / "keys" / other
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    (problem,) = Repository.open(str(repo_dir), password).check().problems
    assert problem.object == f"keys/{other}" and f"`key remove {other[:12]}` removes it" in problem.problem
    repo = Repository.open(str(repo_dir), password)
    repo.remove_key(other[:12])
    assert repo.check().ok


def test_an_unreadable_manifest_says_what_to_do(repo_with_data, password):
    """It said only "manifest unreadable": nothing about the repairs that end with forgetting it."""
    repo_dir, repo, s1, _ = repo_with_data
    loc = repo.store.locate(bytes.fromhex(s1.manifest[0]))
    (victim,) = [p for p in packs(repo_dir) if p.name == repo.store.pack_ids[loc.pack_no].hex()]
    os.remove(victim)
    problems = {p.object: p.problem for p in Repository.open(str(repo_dir), password).check().problems}
    assert "manifest unreadable" in problems[f"snapshots/{s1.id}"]
    assert "then `repair snapshots` lists the snapshots to forget" in problems[f"snapshots/{s1.id}"]


def test_a_size_subset_reads_random_packs_holding_at_least_that_much(repo_with_data):
    repo_dir, repo, _, _ = repo_with_data
    sizes = sorted((p.stat().st_size for p in packs(repo_dir)), reverse=True)
    assert len(sizes) >= 4
    r = repo.check(subset=f"{sizes[0] + 1}b")  # more than the largest pack: two at least, never all
    assert r.ok and 2 <= r.packs_read < r.packs
    assert r.bytes_read > 0
    assert repo.check(subset="1T").packs_read == r.packs  # more than the repository holds: every pack


@given(st.dictionaries(st.binary(min_size=32, max_size=32), st.integers(1, 1 << 30), max_size=40),
       st.integers(1, 1 << 32))
def test_size_subset_selection(packs_by_id, size):
    """The packs drawn hold at least ``size`` bytes, or are all of them; without the largest of them they
    hold less (no pack is drawn once ``size`` is reached)."""
    from chunkvault.store.check import _packs_holding

    chosen = _packs_holding(size)(packs_by_id)
    held = sum(packs_by_id[p] for p in chosen)
    assert chosen <= packs_by_id.keys()
    assert held >= size or chosen == packs_by_id.keys()
    assert not chosen or held - max(packs_by_id[p] for p in chosen) < size


@given(st.sets(st.binary(min_size=32, max_size=32), max_size=60), st.sampled_from(["1%", "5%", "25%", "34%", "100%"]))
def test_a_percentage_subset_reads_that_share_of_the_packs_and_never_none(pack_ids, spec):
    """``25%`` of 4 packs is one pack, every time (each pack drawn by chance alone left some runs with none
    read, which then passed as "no problems")."""
    from chunkvault.store.check import parse_subset

    select = parse_subset(spec)
    assert select is not None
    chosen = select({p: 1 for p in pack_ids})
    assert chosen <= pack_ids
    share = float(spec[:-1]) / 100
    assert len(chosen) == (max(1, round(len(pack_ids) * share)) if pack_ids else 0)


@pytest.mark.parametrize("spec", ["3", "0/3", "4/3", "0%", "101%", "2X", "0M", ""])
def test_a_bad_subset_is_one_usage_error(repo_with_data, spec):
    from chunkvault.errors import UsageError

    _, repo, _, _ = repo_with_data
    with pytest.raises(UsageError, match="bad read-data subset .*or a size like 500M"):
        repo.check(subset=spec)


def test_a_slice_that_holds_no_pack_says_it_read_none(repo_with_data, cli):
    """A slice n/m of the packs by id may hold none of them: the summary said nothing of reading, as if the
    data had been read."""
    repo_dir, _, _, _ = repo_with_data
    ids = [int(p.name[:8], 16) for p in packs(repo_dir)]
    m = len(ids) + 1
    n = next(n for n in range(1, m + 1) if all(i % m != n - 1 for i in ids))
    out = cli("check", "-r", str(repo_dir), "--read-data-subset", f"{n}/{m}").stdout.decode()
    assert f"; read no packs: slice {n}/{m} of --read-data-subset holds none of them: no problems" in out, out
    out = cli("check", "-r", str(repo_dir), "--read-data-subset", "1/1").stdout.decode()
    assert f"; read {len(ids)} packs (" in out and "read no packs" not in out, out


def test_check_walks_a_long_chain_once(tmp_path, new_repo, monkeypatch):
    """Each snapshot's chain was walked whole, twice (whether it resolves, and where it breaks): a check of
    one chain of 3,000 differentials took 9 s, against 5 s for 17,000 snapshots in daily chains."""
    from chunkvault.store import chain

    src = tmp_path / "src"
    src.mkdir()
    repo = new_repo(str(tmp_path / "repo"))
    n = 30
    for i in range(n):
        (src / "f").write_text(f"version {i}")
        repo.backup([str(src)], kind="full" if i == 0 else "diff")
    walked = []
    real = chain.chain_to_base
    monkeypatch.setattr(chain, "chain_to_base", lambda sid, parents: walked.append(1) or real(sid, parents))
    report = repo.check()
    assert report.ok and report.snapshots == n
    assert len(walked) <= 2, len(walked)
    # a chain cut off is still found, each snapshot built on the gone one named
    os.remove(tmp_path / "repo" / "snapshots" / repo.snapshots()[n // 2].id)
    report = repo.check()
    broken = [p for p in report.problems if "chain does not resolve" in str(p)]
    assert len(broken) == n - n // 2 - 1, [str(p) for p in report.problems]
