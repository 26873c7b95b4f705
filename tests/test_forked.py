"""Forked workers: results in order, errors back as themselves, deaths and the parent's own errors handled.

Each case runs in a fresh interpreter: forking is for processes with no other thread.
"""
import json
import re
import subprocess
import sys
import textwrap

_CASES = {
    "results": """
        def work(k, rep):
            for i in range(3):
                rep.progress((k, i))
            return [k] * (k + 1)
        seen = []
        with forked.Workers(3, work) as w:
            out = w.wait(seen.append)
        print(json.dumps({"results": out, "progress_lists": len(seen[-1])}))
    """,
    "error": """
        from chunkvault.errors import CorruptObject
        def work(k, rep):
            if k == 1:
                raise CorruptObject("blob 00ff", "does not hash to its id")
            return k
        try:
            with forked.Workers(2, work) as w:
                w.wait()
        except CorruptObject as exc:
            print(json.dumps({"type": type(exc).__name__, "text": str(exc), "object": exc.object_name,
                              "reason": exc.reason}))
    """,
    "unpicklable": """
        from chunkvault.errors import ChunkvaultError
        def work(k, rep):
            class Odd(Exception):  # a class local to a function does not pickle
                pass
            raise Odd("local class")
        try:
            with forked.Workers(1, work) as w:
                w.wait()
        except ChunkvaultError as exc:
            print(json.dumps({"text": str(exc)}))
    """,
    "killed": """
        import os, signal
        from chunkvault.errors import ChunkvaultError
        def work(k, rep):
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            with forked.Workers(1, work) as w:
                w.wait()
        except ChunkvaultError as exc:
            print(json.dumps({"text": str(exc)}))
    """,
    "parent_fails": """
        import os, time
        def work(k, rep):
            time.sleep(600)
        start = time.monotonic()
        try:
            with forked.Workers(2, work) as w:
                pids = [x.pid for x in w.workers]
                raise KeyError("the parent's own error")
        except KeyError:
            pass
        gone = []
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                gone.append(pid)
        print(json.dumps({"gone": len(gone), "seconds": time.monotonic() - start}))
    """,
    "quiet_thread": """
        import threading, time
        from chunkvault.remotes.local import LocalRemote
        from chunkvault.store.forksafe import FORK_GUARD, start_quiet_thread
        remote = LocalRemote("/nonexistent-never-created")
        stop, working = threading.Event(), threading.Event()
        def refresher():
            with FORK_GUARD:  # mid-work when the fork is asked for
                working.set()
                time.sleep(0.5)
            stop.wait()
        start_quiet_thread(refresher, "refresher")
        working.wait()
        quiet_ok = forked.can_fork(remote)
        start = time.monotonic()
        with forked.Workers(1, lambda k, rep: time.monotonic()) as w:
            (child_time,) = w.wait()
        loud = threading.Thread(target=stop.wait)
        loud.start()
        loud_ok = forked.can_fork(remote)
        stop.set()
        loud.join()
        print(json.dumps({"quiet": quiet_ok, "loud": loud_ok, "forked_after_work": child_time - start}))
    """,
    "warnings_are_errors": """
        import os, threading, warnings
        from chunkvault.store.forksafe import start_quiet_thread
        real_fork = os.fork
        def fork_as_3_12():  # what Python 3.12+ does in the parent when other threads are alive
            pid = real_fork()
            if pid and threading.active_count() > 1:
                warnings.warn(f"This process (pid={os.getpid()}) is multi-threaded, use of fork() may lead "
                              "to deadlocks in the child.", DeprecationWarning, stacklevel=2)
            return pid
        os.fork = fork_as_3_12
        stop = threading.Event()
        start_quiet_thread(stop.wait, "quiet")
        warnings.simplefilter("error")
        with forked.Workers(2, lambda k, rep: k * 10) as w:
            out = w.wait()
        stop.set()
        print(json.dumps({"results": out, "filters_kept": warnings.filters[0][0] == "error"}))
    """,
    "out_of_descriptors": """
        import os, resource, time
        from chunkvault.errors import ChunkvaultError
        fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
        before = fds()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (before + 9, hard))  # pipes for some workers, not 20
        try:
            with forked.Workers(20, lambda k, rep: time.sleep(30)) as w:
                w.wait()
        except ChunkvaultError as exc:
            text = str(exc)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            left = os.waitpid(-1, os.WNOHANG)[0]
        except ChildProcessError:
            left = None
        print(json.dumps({"text": text, "fds_left": fds() - before, "child_left": left}))
    """,
}


def _run(case: str) -> dict:
    script = "import json\nfrom chunkvault.store import forked\n" + textwrap.dedent(_CASES[case])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_results_come_back_in_worker_order_with_progress():
    r = _run("results")
    assert r == {"results": [[0], [1, 1], [2, 2, 2]], "progress_lists": 3}


def test_a_workers_exception_is_raised_as_itself():
    r = _run("error")
    assert r == {"type": "CorruptObject", "text": "corrupt object blob 00ff: does not hash to its id",
                 "object": "blob 00ff", "reason": "does not hash to its id"}


def test_an_exception_that_does_not_pickle_travels_as_text():
    assert "Odd: local class" in _run("unpicklable")["text"]


def test_a_killed_worker_is_an_error():
    assert "signal 9" in _run("killed")["text"]


def test_an_error_in_the_parent_ends_the_workers():
    r = _run("parent_fails")
    assert r["gone"] == 2 and r["seconds"] < 60


def test_a_quiet_thread_lets_workers_fork_but_never_mid_work():
    """A lock's refresher does not stop a restore's workers; a fork waits for its work to end."""
    r = _run("quiet_thread")
    assert r["quiet"] is True and r["loud"] is False
    assert r["forked_after_work"] >= 0.3


def test_forking_beside_a_quiet_thread_where_warnings_are_errors():
    """A program that turns warnings into errors still gets its workers: Python 3.12+ warns of any fork
    with another thread alive, in the parent, after the child has started."""
    assert _run("warnings_are_errors") == {"results": [0, 10], "filters_kept": True}



def test_workers_that_cannot_all_start_leave_no_process_nor_descriptor():
    """Out of descriptors (or processes) part-way: the workers already started are ended and reaped, their
    pipes closed, and the error says so, instead of a bare OSError with zombies and every descriptor held."""
    r = _run("out_of_descriptors")
    assert r["fds_left"] == 0 and r["child_left"] is None
    assert re.fullmatch(r"could not start worker process \d+ of 20 \(Too many open files\); none is left running: "
                        r"raise the limit \(ulimit -n, LimitNOFILE=\)", r["text"]), r["text"]
