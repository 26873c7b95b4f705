"""The export / import commands, and ``restore --from-file``.

``add_commands`` registers ``export`` and ``import`` and gives ``restore`` its
``--from-file`` and ``--export-password-file`` / ``-command`` options; ``cmd_restore`` hands a
``--from-file`` restore to ``restore_from_file_cli``, which opens no
repository.  The export password is separate from any repository password:
it is what a recipient of the file needs.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

from . import passwords
from .display import one_line, warn
from .errors import UsageError
from .store.snapshot import said_second
from .units import format_size


def cmd_export(args: argparse.Namespace) -> int:
    from . import cli
    from .store.export import export

    repo = cli._open(args)
    snap = cli.chosen_snapshot(repo, args)
    password = passwords.EXPORT.get(args, confirm=True)
    stats = export(repo.store, snap, args.output, password, kdf_seconds=args.kdf_time, overwrite=args.force)
    if args.json:
        cli._emit_json({"snapshot": snap.id, "type": snap.kind, **cli._name_json("output", stats.path),
                        "file_id": stats.file_id, "files": stats.files, "dirs": stats.dirs, "bytes": stats.bytes,
                        "records": stats.records, "blobs": stats.blobs, "blob_bytes": stats.blob_bytes,
                        "file_bytes": stats.file_bytes, "duration": stats.duration})
    elif not args.quiet:
        print(f"exported {snap.kind} snapshot {snap.short_id} ({said_second(snap.datetime)}) to "
              f"{one_line(stats.path)}: "
              f"{stats.files} files, {stats.dirs} dirs, {format_size(stats.bytes)}; {stats.blobs} chunks, "
              f"file {format_size(stats.file_bytes)} in {stats.duration:.2f} s")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from . import cli
    from .store.copy import IMPORTED_FROM

    repo = cli._open(args)
    password = passwords.EXPORT.get(args)
    result = repo.import_backup(args.file, password, wait=args.wait, delta=not args.no_delta,
                                no_delta=args.no_delta_path, fixed_chunks=args.fixed_chunks)
    snap = result.snapshot
    st = snap.stats
    if result.incomplete:
        old = " ".join(c.short_id for c in result.incomplete)
        copies = "copy" if len(result.incomplete) == 1 else "copies"
        warn(f"this repository's {copies} {old} of the file's snapshot no longer held all of it (a rewrite, a "
             f"repair or lost data): the import {snap.short_id} is ordered after {'it' if copies == 'copy' else 'them'}"
             f" (`latest`, retention); `forget {old}` removes the incomplete {copies}")
    if args.json:
        cli._emit_json({**cli._snapshot_json(snap), "skipped": result.skipped,
                        "heals": result.heals.id if result.heals is not None else None,
                        **cli._names_json("warnings", result.warnings)})
    elif result.skipped:
        exported = result.exported_id
        warn(f"{args.file}: its snapshot {exported[:8]} is in this repository already"
             + (f" (as {snap.short_id})" if exported != snap.id else "") + ": nothing imported")
    elif not args.quiet:
        for w in result.warnings:
            warn(w)
        print(f"imported {one_line(args.file)} as full snapshot {snap.short_id} ({said_second(snap.datetime)}, "
              f"exported from {st[IMPORTED_FROM][:8]}): {st['files']} files, {st['dirs']} dirs, {format_size(st['bytes'])}; "
              f"added {format_size(st['added_raw_bytes'])} of new data, stored as "
              f"{format_size(st['added_stored_bytes'])} ({format_size(st['delta_stored_bytes'])} as deltas, "
              f"{format_size(st['whole_stored_bytes'])} whole)")
    return 0


def restore_from_file_cli(args: argparse.Namespace) -> int:
    """``restore --from-file FILE``: straight from an export file, no repository opened."""
    from . import cli
    from .store.export import restore_from_file

    if args.snapshot not in (None, "", "latest"):
        raise UsageError("--from-file restores the snapshot in the file: give no SNAPSHOT")
    if args.repo:  # given on the command line (CHUNKVAULT_REPOSITORY may be set for other commands)
        raise UsageError("--from-file restores from the file alone: give no -r/--repo (import brings it into one)")
    if args.until or args.host or args.snapshot_paths:
        raise UsageError("--until, --host and --path select among a repository's snapshots: not with --from-file")
    if args.delta or args.verify:
        raise UsageError(f"--{'delta' if args.delta else 'verify'} needs a repository: not with --from-file "
                         "(verify-restore checks an imported snapshot)")
    if args.processes is not None:  # taken silently, it looked used
        raise UsageError("--processes splits a restore from a repository among processes: a restore --from-file "
                         "runs in one")
    password = passwords.EXPORT.get(args)
    in_place = cli.restore_in_place(args, f"the snapshot in {args.from_file}", repository=False)
    if args.delete and not in_place and os.path.isdir(args.target) and os.listdir(args.target):
        raise UsageError("--delete works in place: add --confirm RESTORE")
    bar = cli._progress(args, "restore")
    info, result = restore_from_file(args.from_file, password, args.target, includes=args.include,
                                     excludes=args.exclude, iexcludes=args.iexclude, force=in_place,
                                     delete=args.delete, progress=bar,
                                     numeric_owner=args.numeric_owner, overwrite=args.overwrite,
                                     xattrs=not args.no_xattrs, target_wait=cli.target_wait(args))
    bar.done()
    snap = info.snapshot
    if args.json:
        cli._emit_json({**cli._name_json("file", os.path.abspath(args.from_file)), "snapshot": snap.id,
                        "time": snap.time, **cli._name_json("target", os.path.abspath(args.target)), "files": result.files, "dirs": result.dirs,
                        "links": result.links, "specials": result.specials, "bytes": result.bytes,
                        "skipped_existing": result.skipped_existing, "deleted": result.deleted,
                        **cli._names_json("warnings", result.warnings)})
    elif not args.quiet:
        for w in result.warnings:
            warn(w)
        print(f"restored snapshot {snap.short_id} ({said_second(snap.datetime)}) from {one_line(args.from_file)} "
              f"to {one_line(args.target)}: {cli._restored(result)}")
    return 0


def add_commands(subparsers: Any, common: argparse.ArgumentParser, reading: argparse.ArgumentParser) -> None:
    """Register ``export`` and ``import``; add ``--from-file`` to an existing ``restore`` parser."""
    from .cli import _seconds, _wait_option, add_snapshot_choice

    s = subparsers.add_parser("export", parents=[common, reading],
                              help="write one snapshot (chain resolved) into a self-contained encrypted .backup file")
    s.add_argument("snapshot", nargs="?", default="latest", help="id, unique prefix, or latest")
    s.add_argument("--output", required=True, metavar="FILE.backup")
    add_snapshot_choice(s)
    passwords.EXPORT.add_options(s, "the export password")
    s.add_argument("--kdf-time", type=_seconds, default=0.5, metavar="SECONDS",
                   help="seconds the export password's derivation should take (default 0.5)")
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.set_defaults(func=cmd_export, read_lock="export")

    s = subparsers.add_parser("import", parents=[common], help="bring a .backup file in as a full snapshot")
    s.add_argument("file", metavar="FILE.backup")
    passwords.EXPORT.add_options(s, "the export password")
    _wait_option(s, 3600.0, "a running prune, forget or repair (as a backup waits)")
    s.add_argument("--no-delta", action="store_true", help="never store changed chunks as deltas")
    s.add_argument("--no-delta-path", action="append", default=[], metavar="GLOB",
                   help="paths whose chunks are never stored as deltas")
    s.add_argument("--fixed-chunks", action="append", default=[], metavar="GLOB",
                   help="paths the snapshot's backups cut at fixed offsets (backup --fixed-chunks): their delta "
                        "chains run as deep as a backup's")
    s.set_defaults(func=cmd_import)

    restore = subparsers.choices.get("restore")
    if restore is not None:
        restore.add_argument("--from-file", metavar="FILE.backup",
                             help="restore straight from an export file (no repository)")
        passwords.EXPORT.add_options(restore, "the export password (with --from-file)")
