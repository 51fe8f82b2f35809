"""Accounts for the web app: who may log in, and who may see every job.

`HOTFIX_USERS` names a file of `user:hash` lines (a `#` starts a comment). Make a hash with
`python -m unlearn_core.accounts` (it asks for the password): PBKDF2-SHA256 from the standard
library, salted, 600,000 rounds, written as `pbkdf2_sha256$rounds$salt$digest`. The single
`HOTFIX_USERNAME` / `HOTFIX_PASSWORD` pair still works for one account. Users named in
`HOTFIX_ADMINS` see and act on every job; everyone else sees only their own.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import secrets
import sys
from pathlib import Path

from unlearn_core.errors import InvalidInput

ROUNDS = 600_000


def hash_password(password: str, rounds: int = ROUNDS) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, rounds)
    return f"pbkdf2_sha256${rounds}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, rounds, salt, digest = stored.split("$")
        if scheme != "pbkdf2_sha256":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(rounds))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def read_users(path: Path) -> dict[str, str]:
    """user → stored hash, from a HOTFIX_USERS file."""
    users = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        user, _, stored = line.partition(":")
        if not user.strip() or not stored.strip():
            raise InvalidInput(f"HOTFIX_USERS line {number}: expected user:hash")
        users[user.strip()] = stored.strip()
    return users


class Accounts:
    """The login check Gradio calls (`launch(auth=accounts.check)`), and who is an admin."""

    def __init__(self, users: dict[str, str], admins: tuple[str, ...] = (), single: tuple[str, str] | None = None):
        self.users, self.admins, self.single = users, set(admins), single

    @property
    def required(self) -> bool:
        return bool(self.users or self.single)

    def check(self, username: str, password: str) -> bool:
        if self.single and hmac.compare_digest(username.encode(), self.single[0].encode()) and hmac.compare_digest(password.encode(), self.single[1].encode()):
            return True
        stored = self.users.get(username)
        return stored is not None and verify_password(password, stored)

    def is_admin(self, username: str | None) -> bool:
        return bool(username) and username in self.admins


def main() -> int:
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        print("the two passwords differ", file=sys.stderr)
        return 2
    print(hash_password(first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
