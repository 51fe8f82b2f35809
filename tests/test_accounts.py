"""Several accounts from a HOTFIX_USERS file: salted PBKDF2 hashes, the single-pair fallback, admins."""

import pytest

from unlearn_core.accounts import Accounts, hash_password, read_users, verify_password
from unlearn_core.errors import InvalidInput


def test_users_file_logs_in_each_user_with_their_own_password(tmp_path):
    users = tmp_path / "users"
    users.write_text(f"# operators\nalice:{hash_password('alice-pw', rounds=1000)}\nbob:{hash_password('bob-pw', rounds=1000)}\n")
    accounts = Accounts(read_users(users), admins=("alice",), single=("ops", "ops-pw"))
    assert accounts.required
    assert accounts.check("alice", "alice-pw") and accounts.check("bob", "bob-pw") and accounts.check("ops", "ops-pw")
    assert not accounts.check("alice", "bob-pw") and not accounts.check("carol", "x") and not accounts.check("ops", "alice-pw")
    assert accounts.is_admin("alice") and not accounts.is_admin("bob") and not accounts.is_admin(None)
    assert not Accounts({}).required


def test_hashes_are_salted_and_bad_lines_refused(tmp_path):
    first, second = hash_password("same", rounds=1000), hash_password("same", rounds=1000)
    assert first != second and verify_password("same", first) and verify_password("same", second)
    assert not verify_password("same", "plain-text-password") and not verify_password("same", "md5$1$x$y")
    broken = tmp_path / "users"
    broken.write_text("alice\n")
    with pytest.raises(InvalidInput, match="line 1"):
        read_users(broken)
