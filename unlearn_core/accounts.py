"""Accounts for the web app: who may log in, and who may see every job.

`HOTFIX_USERS` names a file of `user:hash` lines (a `#` starts a comment). Make a hash with
`python -m unlearn_core.accounts` (it asks for the password): PBKDF2-SHA256 from the standard
library, salted, 600,000 rounds, written as `pbkdf2_sha256$rounds$salt$digest`. The single
`HOTFIX_USERNAME` / `HOTFIX_PASSWORD` pair still works for one account. Users named in
`HOTFIX_ADMINS` see and act on every job; everyone else sees only their own.

A wrong password for an unknown user costs the same hashing as for a known one (a dummy hash of
the same rounds), so the time of an answer does not tell which usernames exist. `LoginLimiter`
refuses a username or an address that failed `HOTFIX_LOGIN_FAILURES` times (5) within
`HOTFIX_LOGIN_WINDOW_S` (60 s) without hashing anything. The web app runs the check in a thread
(`ui.login`), off Gradio's event loop.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import hmac
import secrets
import sys
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path

from unlearn_core.errors import InvalidInput, OperatorError

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


def _rounds(stored: str) -> int:
    try:
        return int(stored.split("$")[1])
    except (IndexError, ValueError):
        return 0


class TooManyAttempts(OperatorError):
    """Logins refused for a while: this username or address failed too often."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LoginLimiter:
    """Failed logins per key (a username, an address) in a sliding window; thread-safe, bounded."""

    MAX_KEYS = 10_000

    def __init__(self, failures: int = 5, window_s: float = 60.0):
        self.failures, self.window_s = failures, window_s
        self._seen: OrderedDict[str, deque] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque:
        times = self._seen.get(key) or deque()
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def check(self, *keys: str) -> None:
        """Raise `TooManyAttempts` if any key used up its failures in the window."""
        now = time.monotonic()
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                if len(times) >= self.failures:
                    wait = self.window_s - (now - times[0])
                    raise TooManyAttempts(f"too many failed logins; try again in {max(1, round(wait))} s", wait)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                times = self._recent(key, now)
                times.append(now)
                self._seen[key] = times
                self._seen.move_to_end(key)
            while len(self._seen) > self.MAX_KEYS:
                self._seen.popitem(last=False)


class Accounts:
    """The login check Gradio calls (`launch(auth=...)`, through `ui.login`), and who is an admin."""

    def __init__(self, users: dict[str, str], admins: tuple[str, ...] = (), single: tuple[str, str] | None = None,
                 limiter: LoginLimiter | None = None):
        self.users, self.admins, self.single = users, set(admins), single
        self.limiter = limiter or LoginLimiter()
        # an unknown username is hashed against this, with the rounds of the real hashes
        self._dummy = hash_password(secrets.token_urlsafe(16), max([_rounds(h) for h in users.values()] + [1]) if users else 1)

    @property
    def required(self) -> bool:
        return bool(self.users or self.single)

    def check(self, username: str, password: str) -> bool:
        """Whether the password is the user's: the same hashing work for an unknown user."""
        if self.single and hmac.compare_digest(username.encode(), self.single[0].encode()) and hmac.compare_digest(password.encode(), self.single[1].encode()):
            return True
        stored = self.users.get(username)
        matches = verify_password(password, stored if stored is not None else self._dummy)
        return stored is not None and matches

    def login(self, username: str, password: str, address: str = "") -> bool:
        """`check` behind the rate limit per username and per address (raises `TooManyAttempts`)."""
        keys = [f"user:{username}"] + ([f"address:{address}"] if address else [])
        self.limiter.check(*keys)
        if self.check(username, password):
            return True
        self.limiter.failed(*keys)
        return False

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
