"""How every handler's error leaves the server: `fail` scrubs a message of server paths, and
`guard_handlers` wraps every event handler of the page so that all of them go through it."""

from __future__ import annotations

import functools
import inspect
import logging

import gradio as gr

from unlearn_core.errors import without_server_paths


def plain(text) -> str:
    """`text` fit to leave the server: every absolute path cut to its last part
    (`unlearn_core.errors.without_server_paths`). For warnings and status lines a handler shows."""
    return without_server_paths(str(text))


def fail(error: Exception | str) -> gr.Error:
    """An operator-facing error for a handler to raise: the reason, without a traceback and without
    server paths. Every message that leaves a handler as an error passes here: the handlers' own
    (`raise fail(error)`), and, through `guard_handlers`, any `gr.Error` raised directly and any
    unexpected exception (which becomes a generic line; its traceback goes to the server's log)."""
    if isinstance(error, gr.Error):
        error.message, error.title = plain(error.message), plain(error.title)
        return error
    text = error if isinstance(error, str) else str(error)
    return gr.Error(plain(text) or type(error).__name__)


UNEXPECTED = "Something went wrong on the server ({kind}); the details are in the server's log."
_log = logging.getLogger("hotfix_studio.ui")


def _unexpected(error: Exception, name: str) -> gr.Error:
    _log.error("handler %s failed", name, exc_info=(type(error), error, error.__traceback__))
    return gr.Error(UNEXPECTED.format(kind=type(error).__name__), print_exception=False)


def guarded(fn):
    """`fn` with its errors sent through `fail`: a `gr.Error` is scrubbed of server paths, anything
    else (a bug, an OSError naming a run file) becomes UNEXPECTED instead of its raw text, which the
    app's `show_error=True` would otherwise show. Keeps `fn`'s signature (Gradio reads it to pass
    `gr.Request`) and its kind (plain, coroutine or generator function)."""
    if getattr(fn, "_guarded", False):
        return fn
    name = getattr(fn, "__name__", "handler")

    def convert(error: Exception) -> gr.Error:
        return fail(error) if isinstance(error, gr.Error) else _unexpected(error, name)

    if inspect.isasyncgenfunction(fn):
        async def wrapper(*args, **kwargs):
            try:
                async for item in fn(*args, **kwargs):
                    yield item
            except Exception as error:
                raise convert(error) from None
    elif inspect.iscoroutinefunction(fn):
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except Exception as error:
                raise convert(error) from None
    elif inspect.isgeneratorfunction(fn):
        def wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as error:
                raise convert(error) from None
    else:
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as error:
                raise convert(error) from None
    wrapper = functools.wraps(fn)(wrapper)
    wrapper._guarded = True
    return wrapper


def guard_handlers(blocks: gr.Blocks) -> None:
    """Every event handler of `blocks` wrapped by `guarded`: the one place all of them go through,
    so no message a handler raises, planned or not, carries a server path. Called by app.build
    once the page is composed."""
    for block_fn in blocks.fns.values():
        if block_fn.fn is not None:
            block_fn.fn = guarded(block_fn.fn)
