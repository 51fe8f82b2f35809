"""Several accounts from a HOTFIX_USERS file: salted PBKDF2 hashes, the single-pair fallback, admins."""

import pytest

from unlearn_core.accounts import Accounts, hash_password, read_users, verify_password
from tests.gradio_calls import handler_call, hugging_face_request
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


def test_a_space_sign_in_owns_the_jobs_across_sessions(monkeypatch):
    import gradio as gr

    from ui.common import identity_of, owner_of
    from unlearn_core import settings

    def who(request: gr.Request, profile: gr.OAuthProfile | None):  # as every handler that asks who calls it
        return identity_of(request, profile), owner_of(request, profile)

    monkeypatch.setattr(settings, "_current", settings.Settings.from_env({"HOTFIX_ADMINS": "trust-lead"}))
    assert handler_call(who, hugging_face_request("alice", session_hash="tab-1"))[0] == handler_call(who, hugging_face_request("alice", session_hash="tab-2"))[0] == "hf:alice"
    assert handler_call(who, hugging_face_request("bob")) == ("hf:bob", "hf:bob")
    assert handler_call(who, hugging_face_request(None, session_hash="tab-3"))[0] == "session:tab-3"
    assert handler_call(who, hugging_face_request("alice", expires_in=-1, session_hash="tab-4"))[0] == "session:tab-4"  # an expired sign-in is none
    assert handler_call(who, hugging_face_request("trust-lead"))[1] is None


def test_every_handler_that_identifies_its_caller_gets_the_sign_in_from_gradio(tmp_path):
    """Public Gradio APIs only: every handler with a gr.Request parameter also has a
    `gr.OAuthProfile | None` one (Gradio fills it in), and no module reads Gradio's private names."""
    import inspect
    import re
    import typing
    from pathlib import Path

    import gradio as gr

    import app
    from ui.common import Services
    from unlearn_core.store import JobStore
    from unlearn_core.worker import JobWorker

    store = JobStore(tmp_path / "runs")
    demo = app.build(Services(store, JobWorker(store)))
    def hints(fn) -> set:
        fn = inspect.unwrap(fn)
        fn = getattr(fn, "func", fn)  # a functools.partial's function
        return set(typing.get_type_hints(fn).values())

    with_request = [block.fn for block in demo.fns.values() if block.fn is not None and gr.Request in hints(block.fn)]
    assert len(with_request) >= 10
    for fn in with_request:
        assert gr.OAuthProfile | None in hints(fn), f"{fn.__name__} asks for the request but not for the signed-in profile"
    root = Path(app.__file__).parent
    private = [f"{path.name}:{number}" for path in [root / "app.py", *sorted((root / "ui").glob("*.py"))]
               for number, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"gradio\.(helpers|oauth)\._", line)]
    assert private == []


def test_the_sign_in_button_appears_only_on_a_space_with_oauth(tmp_path):
    """app.build in a fresh process (Gradio reads the OAuth variables when it is imported), with the
    variables a Space with `hf_oauth: true` sets, and without them."""
    import os
    import subprocess
    import sys

    count = ("import gradio as gr, app; from unlearn_core.store import JobStore; from unlearn_core.worker import JobWorker; from ui.common import Services; "
             f"store = JobStore({str(tmp_path / 'runs')!r}); "
             "print(sum(isinstance(b, gr.LoginButton) for b in app.build(Services(store, JobWorker(store))).blocks.values()))")
    space = {"SYSTEM": "spaces", "SPACE_ID": "someone/hotfix-studio", "OAUTH_CLIENT_ID": "client-id", "OAUTH_CLIENT_SECRET": "secret",
             "OAUTH_SCOPES": "openid profile", "OPENID_PROVIDER_URL": "https://huggingface.co"}
    base = {key: value for key, value in os.environ.items() if key not in space}

    def login_buttons(extra: dict) -> int:
        done = subprocess.run([sys.executable, "-c", count], env={**base, **extra}, capture_output=True, text=True, timeout=300)  # importing gradio is slow on a busy machine
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.strip().splitlines()[-1])

    assert login_buttons({}) == 0
    assert login_buttons({"SPACE_ID": "someone/hotfix-studio", "OAUTH_CLIENT_ID": "client-id"}) == 0  # not on a Space
    assert login_buttons(space) == 1


def test_unknown_users_cost_the_same_hashing_and_failures_are_rate_limited(tmp_path):
    """A wrong password for a real user took 0.9-1.4 s and for an unknown one 0.07 s: the time told
    which usernames exist. Both hash now (an unknown one against a dummy of the same rounds). And the
    N+1-th quick failure of a username, or of an address, is refused without hashing."""
    import statistics
    import time

    from unlearn_core.accounts import LoginLimiter, TooManyAttempts

    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('alice-pw', rounds=100_000)}\n")
    accounts = Accounts(read_users(users), limiter=LoginLimiter(failures=3, window_s=60))

    def seconds(username: str) -> float:
        started = time.perf_counter()
        assert not accounts.check(username, "wrong")
        return time.perf_counter() - started

    real = statistics.median(seconds("alice") for _ in range(3))
    unknown = statistics.median(seconds("mallory") for _ in range(3))
    assert 0.5 < unknown / real < 2.0, f"wrong password: {real:.3f} s for a real user, {unknown:.3f} s for an unknown one"

    for _ in range(3):
        assert not accounts.login("alice", "wrong", "203.0.113.7")
    started = time.perf_counter()
    with pytest.raises(TooManyAttempts, match=r"too many failed logins; try again in \d+ s"):
        accounts.login("alice", "alice-pw", "198.51.100.1")  # even the right password, from elsewhere: the username is limited
    assert time.perf_counter() - started < real / 4, "a limited login still hashed"
    with pytest.raises(TooManyAttempts):
        accounts.login("bob", "x", "203.0.113.7")  # and so is the address, for every username
    assert Accounts(read_users(users)).login("alice", "alice-pw", "198.51.100.1")  # a fresh limiter: the right password works
