"""Handlers called as Gradio calls them: a real gr.Request around a real Starlette request, with or
without the session a "Sign in with Hugging Face" leaves, and the special parameters
(gr.Request, gr.OAuthProfile, gr.OAuthToken) filled in by Gradio's own `special_args`."""

from __future__ import annotations

import time


def hugging_face_request(username: str | None, expires_in: float = 3600, session_hash: str = "tab-1", access_token: str = "hf_x"):
    """A real gr.Request whose session carries what Gradio's OAuth routes store after "Sign in with
    Hugging Face" (`oauth_info`); none when `username` is None."""
    import gradio as gr
    from starlette.requests import Request

    userinfo = {"name": username, "preferred_username": username, "profile": f"https://huggingface.co/{username}", "picture": ""}
    session = {} if username is None else {"oauth_info": {"userinfo": userinfo, "expires_at": time.time() + expires_in, "access_token": access_token,
                                                          "scope": "openid profile write-repos manage-repos"}}
    return gr.Request(request=Request({"type": "http", "method": "GET", "path": "/", "headers": [], "session": session}), session_hash=session_hash)


def handler_call(fn, request, inputs=()):
    """`fn` called as Gradio calls an event handler (gradio.helpers.special_args)."""
    from gradio.helpers import special_args

    args, *_ = special_args(fn, list(inputs), request)
    return fn(*args)


def handler_named(demo, name: str):
    """The event handler of the built page whose function is called `name`."""
    import inspect

    def name_of(fn) -> str:
        fn = inspect.unwrap(fn)
        return getattr(getattr(fn, "func", fn), "__name__", "")  # a functools.partial by its function's name

    found = [block.fn for block in demo.fns.values() if block.fn is not None and name_of(block.fn) == name]
    assert len(found) == 1, f"{len(found)} handlers named {name}"
    return found[0]
