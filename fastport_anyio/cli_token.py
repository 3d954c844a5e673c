"""``fastport token mint``: a scoped token for a session, as an application's backend would mint it.

Backends normally mint tokens with their own JWT library (HS256 over the session's token key, see
docs/security.md); this command is the reference and the tool for scripts and tests. It prints the token on
stdout. The token key comes from ``--token-key`` or ``FASTPORT_TOKEN_KEY`` (prefer the variable: a flag
shows in the process list). Exit codes: 0 ok, 2 usage error (bad key, filter or duration).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Final

from fastport_core.errors import LocalProtocolError
from fastport_core.tokens import mint_token

__all__ = ["parse_duration", "register", "run_mint"]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2

_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` → seconds (positive)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive duration (like 90s, 15m, 1h, 7d): {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``token mint`` to the ``fastport`` command's subparsers."""
    token = subparsers.add_parser(
        "token", help="mint scoped tokens", description="Scoped tokens for applications (DESIGN §10)."
    )
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    mint = actions.add_parser(
        "mint",
        help="print a token signed with a session's token key",
        description="Print a JWT (HS256) for SESSION, signed with its token key, that expires after --ttl "
        "and grants the given publish and subscribe topic filters. Exit codes: 0 ok, 2 usage error.",
    )
    mint.add_argument("--session", required=True, help="the session the token is for (bound in the token)")
    mint.add_argument("--token-key", help="the session's token key, base64 (env FASTPORT_TOKEN_KEY)")
    mint.add_argument("--sub", metavar="CLIENT_ID", help="bind the token to this clientId")
    mint.add_argument(
        "--publish", metavar="FILTER", nargs="+", action="extend", default=[], help="topics it may publish to"
    )
    mint.add_argument(
        "--subscribe", metavar="FILTER", nargs="+", action="extend", default=[], help="filters it may use"
    )
    mint.add_argument("--ttl", type=parse_duration, default=3600.0, help="lifetime (default 1h)")
    mint.set_defaults(func=run_mint)


def run_mint(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    key = args.token_key if args.token_key is not None else environ.get("FASTPORT_TOKEN_KEY")
    if not key:
        print("fastport token: missing --token-key (or FASTPORT_TOKEN_KEY)", file=sys.stderr, flush=True)
        return EXIT_USAGE
    try:
        token = mint_token(
            key,
            expires_at=time.time() + args.ttl,
            session=args.session,
            sub=args.sub,
            publish=args.publish,
            subscribe=args.subscribe,
        )
    except LocalProtocolError as exc:
        print(f"fastport token: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    print(token, flush=True)
    return EXIT_OK
