"""``hpfeeds-broker keys``: manage access keys without SQL.

Thin: argv → one ``KeyStore`` call → output. Data (secrets, tables, JSON) goes
to stdout, so ``SECRET=$(hpfeeds-broker keys add ...)`` works; notes go to
stderr. Every failure is one line on stderr and an exit code from ``ExitCode``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TextIO

from ..auth.base import (
    AccessKey,
    BadArguments,
    ExitCode,
    InvalidKey,
    KeyStoreError,
    NoSuchIdent,
    check_channels,
    check_name,
    make_key,
)
from ..auth.jsonfile import PRIVATE_MODE, write_atomic
from ..auth.records import dump_keys, generate_secret, key_to_record, parse_keys
from ..auth.spec import parse_spec
from .blocking import open_store

PROG = "hpfeeds-broker keys"
EXIT_INTERRUPTED = 130  # Ctrl-C, e.g. at the prompt of --secret - or import -

STORE_HELP = (
    "the key store, written like the broker's --auth: sqlite (./sqlite.db, the default), "
    "sqlite:PATH, PATH.json, postgresql://user:password@host:port/db"
)

DURABLE_HELP = (
    "durable: the broker keeps what the key may read while it is away and replays it when it comes back "
    "(see docs/durable.md)"
)

EXIT_CODES = """\
exit codes:
  0  success
  1  unexpected error (a bug: please report it)
  2  bad arguments, unknown store, unreadable or malformed input file
  3  ident already exists
  4  no such ident
  5  store unreachable, cannot be created, locked (beyond a 5 s wait) or not a key store
  6  invalid ident, secret or channel name (empty, not text, or over 255 bytes of UTF-8),
     or a stored key that is not valid (list shows the valid keys, names the others on
     stderr and exits 0)
  130  interrupted (Ctrl-C)
"""

EPILOG = (
    f"""\
stores (--auth, default sqlite):
  sqlite                      ./sqlite.db, the broker's default
  sqlite:PATH                 an sqlite file (the reference broker's schema)
  PATH.json                   a JSON file {{ident: {{owner, secret, pubchans, subchans}}}}
  postgresql://u:pw@host/db   a PostgreSQL database (table authkeys, created when missing)

Changes apply to the broker's next connection; no restart needed.

examples:
  {PROG} add sensor1 --owner alice --pub cowrie.sessions dionaea.capture
  {PROG} grant collector --sub cowrie.sessions
  {PROG} update collector --durable
  {PROG} list --auth postgresql://hpfeeds:secret@db.example/hpfeeds
  {PROG} export --auth sqlite:old/sqlite.db --to keys.json
  {PROG} import keys.json --auth postgresql://hpfeeds:secret@db.example/hpfeeds

"""
    + EXIT_CODES
)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` returns the code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadArguments(f"{message} (see {self.prog} --help)")


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _read_secret(value: str | None, ident: str) -> str | None:
    """``--secret S`` as given; ``--secret -`` reads one line from stdin (keeps it out of ``ps``),
    at a terminal after a prompt and without echo."""
    if value is None:
        return None
    if value == "-":
        if sys.stdin.isatty():
            value = getpass.getpass(f"secret for {ident!r} (not shown): ")
        else:
            value = sys.stdin.readline().rstrip("\r\n")
    if value == "":
        raise InvalidKey("secret must not be empty")
    return value


def _fmt_channels(channels: Iterable[str]) -> str:
    return ", ".join(channels) or "-"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _table(keys: Sequence[AccessKey], out: TextIO) -> None:
    rows = [("IDENT", "OWNER", "DURABLE", "PUBCHANS", "SUBCHANS")]
    rows += [
        (k.ident, k.owner or "-", _yes(k.durable), _fmt_channels(k.pubchans), _fmt_channels(k.subchans)) for k in keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[4]]).rstrip(), file=out)


def _public(key: AccessKey, *, with_secret: bool = False) -> dict[str, object]:
    return {"ident": key.ident, **key_to_record(key, with_secret=with_secret), "durable": key.durable}


def _show(key: AccessKey, out: TextIO, *, with_secret: bool = False) -> None:
    print(f"ident:    {key.ident}", file=out)
    print(f"owner:    {key.owner}", file=out)
    if with_secret:
        print(f"secret:   {key.secret}", file=out)
    print(f"pubchans: {_fmt_channels(key.pubchans)}", file=out)
    print(f"subchans: {_fmt_channels(key.subchans)}", file=out)
    print(f"durable:  {_yes(key.durable)}", file=out)


def _looks_like_sqlite(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _read_source(source: str) -> list[AccessKey]:
    """Keys from ``import``'s argument: ``-`` (stdin), a JSON file, or any store spec."""
    if source == "-":
        if sys.stdin.isatty():
            _note("reading keys (JSON) from the terminal: end with Ctrl-D on a line of its own, Ctrl-C cancels")
        return parse_keys(sys.stdin.read(), "stdin")
    if source.startswith(("sqlite:", "postgresql://", "postgres://")) or source == "sqlite":
        with open_store(source) as store:
            return store.keys()
    if _looks_like_sqlite(source):
        with open_store("sqlite:" + source) as store:
            return store.keys()
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise BadArguments(f"{source}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    return parse_keys(text, source)


# -- commands ------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> None:
    given = _read_secret(args.secret, args.ident)
    key = make_key(args.ident, given or generate_secret(), args.owner, args.pub or (), args.sub or (), args.durable)
    with open_store(args.auth, create=True) as store:
        store.add(key)
        _note(f"added {key.ident!r} to {store.description}")
    if given is None:
        print(key.secret)
        _note("the secret above is shown only once; keys rotate makes a new one")


def _naming(ident: str, err: Exception) -> str:
    """``err``'s text, with the ident in front unless it names it already."""
    return str(err) if repr(ident) in str(err) else f"ident {ident!r}: {err}"


def cmd_list(args: argparse.Namespace) -> None:
    invalid: list[str] = []
    with open_store(args.auth) as store:
        # The valid keys are listed; each invalid one is named on stderr (the
        # broker answers "no such key" for it), so one bad row hides nothing.
        keys = store.keys(skip_invalid=lambda ident, err: invalid.append(_naming(ident, err)))
    for line in invalid:
        _note(f"{PROG}: not a valid key, refused by the broker ({line}); update, rotate or remove fixes it")
    if args.json:
        print(json.dumps([_public(k) for k in keys], indent=2, ensure_ascii=False))
    elif keys:
        _table(keys, sys.stdout)
    else:
        _note("no keys")


def cmd_show(args: argparse.Namespace) -> None:
    with open_store(args.auth) as store:
        key = store.get(args.ident)
    if key is None:
        raise NoSuchIdent(args.ident)
    if args.json:
        print(json.dumps(_public(key, with_secret=args.show_secret), indent=2, ensure_ascii=False))
    else:
        _show(key, sys.stdout, with_secret=args.show_secret)


def _change_channels(args: argparse.Namespace, grant: bool) -> None:
    pub = check_channels("publish channel", args.pub or ())
    sub = check_channels("subscribe channel", args.sub or ())
    if not pub and not sub:
        raise BadArguments(f"{args.command}: give at least one --pub or --sub channel")
    notes: list[str] = []

    def change(key: AccessKey) -> AccessKey:
        notes.clear()
        new = {}
        for what, current, channels in (("pub", key.pubchans, pub), ("sub", key.subchans, sub)):
            if grant:
                notes.extend(f"{what} {c!r} was already granted" for c in channels if c in current)
                new[what] = current + tuple(c for c in channels if c not in current)
            else:
                notes.extend(f"{what} {c!r} was not granted" for c in channels if c not in current)
                new[what] = tuple(c for c in current if c not in channels)
        return replace(key, pubchans=new["pub"], subchans=new["sub"])

    with open_store(args.auth) as store:
        key = store.modify(args.ident, change)
    for note in notes:
        _note(f"{key.ident}: {note}")
    _show(key, sys.stdout)


def cmd_grant(args: argparse.Namespace) -> None:
    _change_channels(args, grant=True)


def cmd_revoke(args: argparse.Namespace) -> None:
    _change_channels(args, grant=False)


def cmd_update(args: argparse.Namespace) -> None:
    if args.owner is None and args.pub is None and args.sub is None and args.durable is None:
        raise BadArguments("update: give --owner, --pub, --sub, --durable or --no-durable")
    pub = None if args.pub is None else check_channels("publish channel", args.pub)
    sub = None if args.sub is None else check_channels("subscribe channel", args.sub)

    def change(key: AccessKey) -> AccessKey:
        return replace(
            key,
            owner=key.owner if args.owner is None else args.owner,
            pubchans=key.pubchans if pub is None else pub,
            subchans=key.subchans if sub is None else sub,
            durable=key.durable if args.durable is None else args.durable,
        )

    with open_store(args.auth) as store:
        key = store.modify(args.ident, change)
    _show(key, sys.stdout)


def cmd_rotate(args: argparse.Namespace) -> None:
    given = _read_secret(args.secret, args.ident)
    secret = given or generate_secret()
    with open_store(args.auth) as store:
        store.modify(args.ident, lambda key: replace(key, secret=secret))
        _note(f"new secret for {args.ident!r} in {store.description}; the old one no longer authenticates")
    if given is None:
        print(secret)


def cmd_remove(args: argparse.Namespace) -> None:
    with open_store(args.auth) as store:
        for ident in args.idents:  # all must exist before any is removed
            try:
                if store.get(ident) is None:
                    raise NoSuchIdent(ident)
            except InvalidKey:
                pass  # it exists, though not as a valid key: removing it is the fix
        for ident in args.idents:
            store.remove(ident)
            _note(f"removed {ident!r} from {store.description}")


def cmd_export(args: argparse.Namespace) -> None:
    with open_store(args.auth) as store:
        keys = store.keys()
    text = dump_keys(keys)
    if args.to in (None, "-"):
        sys.stdout.write(text)
    else:
        try:
            write_atomic(args.to, text, mode=PRIVATE_MODE)  # a new file, renamed over any old one
        except OSError as err:
            raise BadArguments(f"{args.to}: cannot write ({err.strerror or err})") from None
        _note(f"exported {len(keys)} keys to {args.to} (it holds secrets: mode 0600)")


def _put(keys: list[AccessKey], target: str, replace_existing: bool) -> None:
    with open_store(target, create=True) as store:
        count = store.put_many(keys, replace=replace_existing)
        _note(f"imported {count} keys into {store.description}")


def cmd_import(args: argparse.Namespace) -> None:
    _put(_read_source(args.source), args.auth, args.replace)


def cmd_copy(args: argparse.Namespace) -> None:
    parse_spec(args.to)  # a bad target fails before the source is read
    with open_store(args.source) as store:
        keys = store.keys()
    _put(keys, args.to, args.replace)


# -- parser --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Manage hpfeeds access keys (ident, secret, owner, publish and subscribe channels).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--auth", metavar="STORE", default="sqlite", help=STORE_HELP)
    common = _Parser(add_help=False)
    common.add_argument("--auth", metavar="STORE", default=argparse.SUPPRESS, help=STORE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, func: object) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common], epilog=EXIT_CODES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        p.set_defaults(func=func)
        return p

    def channels(p: argparse.ArgumentParser, verb: str, nargs: str = "+") -> None:
        p.add_argument("--pub", nargs=nargs, action="extend" if nargs == "+" else "store", metavar="CHANNEL",
                       help=f"channel(s) to {verb} for publishing")  # fmt: skip
        p.add_argument("--sub", nargs=nargs, action="extend" if nargs == "+" else "store", metavar="CHANNEL",
                       help=f"channel(s) to {verb} for subscribing")  # fmt: skip

    secret_help = "use this secret instead of generating one ('-' reads it from stdin; at a terminal, without echo)"

    p = command("add", "add an ident; prints the generated secret once", cmd_add)
    p.add_argument("ident")
    p.add_argument("--owner", default="", help="who the key belongs to (free text)")
    channels(p, "allow")
    p.add_argument("--secret", help=secret_help)
    p.add_argument("--durable", action="store_true", help=DURABLE_HELP)

    p = command("list", "list idents, owners and channels (never secrets)", cmd_list)
    p.add_argument("--json", action="store_true", help="a JSON list instead of a table")

    p = command("show", "show one ident", cmd_show)
    p.add_argument("ident")
    p.add_argument("--json", action="store_true", help="JSON instead of text")
    p.add_argument("--show-secret", action="store_true", help="include the secret")

    p = command("grant", "allow more channels, keeping the others", cmd_grant)
    p.add_argument("ident")
    channels(p, "add")

    p = command("revoke", "take channels away, keeping the others", cmd_revoke)
    p.add_argument("ident")
    channels(p, "take away")

    p = command("update", "replace the owner or a whole channel list, or turn durable on or off", cmd_update)
    p.add_argument("ident")
    p.add_argument("--owner")
    channels(p, "set (replacing the list; none for empty)", nargs="*")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=None, help=DURABLE_HELP)

    p = command("rotate", "give an ident a new secret; prints it", cmd_rotate)
    p.add_argument("ident")
    p.add_argument("--secret", help=secret_help)

    p = command("remove", "delete idents", cmd_remove)
    p.add_argument("idents", nargs="+", metavar="IDENT")

    p = command("export", "write all keys, with secrets, as JSON", cmd_export)
    p.add_argument("--to", metavar="FILE", help="file to write (mode 0600), or - for stdout (the default)")

    p = command("import", "add keys from a JSON file or another store", cmd_import)
    p.add_argument(
        "source",
        metavar="FILE",
        help="JSON (ours, or a list with identifier/secret/publish/subscribe), a reference sqlite.db, "
        "a store spec, or - for stdin",
    )
    p.add_argument("--replace", action="store_true", help="overwrite idents that exist (default: refuse)")

    p = command("copy", "copy every key from one store to another", cmd_copy)
    p.add_argument("--from", dest="source", metavar="STORE", required=True)
    p.add_argument("--to", metavar="STORE", required=True)
    p.add_argument("--replace", action="store_true", help="overwrite idents that exist (default: refuse)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``keys`` command; returns the exit code (never raises SystemExit)."""
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit:  # --help
            return int(exit.code or 0)
        if args.command is None:
            parser.print_help(sys.stderr)
            return ExitCode.BAD_ARGUMENTS
        if args.command in ("add",):
            check_name("ident", args.ident)
        args.func(args)
    except KeyStoreError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:
        return ExitCode.OK
    except KeyboardInterrupt:
        print(file=sys.stderr)  # past the ^C the terminal shows
        return EXIT_INTERRUPTED
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
