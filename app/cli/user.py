"""`parley user [--name NAME] [--description TEXT]`: your persona ({{user}} in persona texts).

Without options it prints the current profile. A change takes effect on the
next reply and drops only the caches of personas whose preamble uses it.
"""

from __future__ import annotations

import os
import tempfile


def register(subparsers) -> None:
    p = subparsers.add_parser("user", help="show or set your name and description ({{user}})")
    p.add_argument("--name", default=None, help="your name in chats (fills {{user}})")
    p.add_argument("--description", default=None, help="a few words about you, told to every persona")
    p.set_defaults(handler=run)


def run(args) -> int:
    from app.paths import user_profile_path
    from app.personas.user import UserProfile, check_profile, profile_toml, read_profile

    path = user_profile_path()
    profile = read_profile(path)
    if args.name is not None or args.description is not None:
        profile = check_profile({"name": profile.name if args.name is None else args.name,
                                 "description": profile.description if args.description is None else args.description},
                                "parley user")
        _write(path, profile_toml(profile))
    shown = UserProfile(profile.name or "User", profile.description)
    print(f"name: {shown.name}\ndescription: {shown.description or '(none)'}")
    return 0


def _write(path, text: str) -> None:
    from app.errors import ParleyError

    fd, tmp = tempfile.mkstemp(prefix=".user.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise ParleyError(f"Cannot save {path}: {exc.strerror or exc}.") from exc
