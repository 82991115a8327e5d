"""Prompt rendering (chat template + tokenizing) off the event loop, bounded in size and time.

Rendering a multi-megabyte conversation takes seconds of CPU; on the event loop it stalls every client
and the health probes. Here it runs on a small pool of worker threads, each with its own copy of the
(Rust) fast tokenizer (one is not meant to be shared across threads), under a deadline, with a bounded
number of renders waiting. A conversation too large to possibly fit the context is refused before any
work, from its byte length and the tokenizer's longest token.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class PromptRefused(Exception):
    """The conversation cannot be rendered: ``code`` says why (OpenAI-style error code)."""

    def __init__(self, message: str, code: str, status: int = 400):
        super().__init__(message)
        self.code, self.status = code, status


def max_token_bytes(tokenizer) -> int:
    """The most UTF-8 bytes of text one token can stand for (its vocabulary string's length, an upper
    bound for byte-level and SentencePiece vocabularies alike)."""
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(t.encode("utf-8", "replace")) for t in vocab), default=16)
    except Exception:  # noqa: BLE001 - an odd tokenizer: assume long tokens (only loosens the pre-check)
        longest = 256
    return max(4, longest)


class PromptRenderer:
    """Renders conversations to prompt token ids on worker threads (see the module docstring)."""

    def __init__(self, tokenizer, max_context: int, *, workers: int = 2, timeout: float = 10.0, max_waiting: int = 8):
        self._template = tokenizer
        self.max_context = max_context
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.max_bytes = max_context * max_token_bytes(tokenizer)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lorastack-render")
        self._copy_lock = threading.Lock()
        self._in_flight = 0

    def _tokenizer(self):
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            with self._copy_lock:  # deepcopy reads the template's state: one copy at a time
                tok = self._local.tokenizer = copy.deepcopy(self._template)
        return tok

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        from lorastack.chat import render_prompt  # the same rendering the trainer uses

        return render_prompt(self._tokenizer(), messages)

    def too_large(self, messages: list[dict[str, Any]]) -> int | None:
        """The conversation's size in bytes if it cannot fit the context whatever the tokenizer does."""
        size = sum(
            len(str(m.get("content", "") if isinstance(m, dict) else m).encode("utf-8", "replace")) for m in messages
        )
        return size if size > self.max_bytes else None

    async def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids; raises PromptRefused (too large, too slow, busy, or refused by the template)."""
        size = self.too_large(messages)
        if size is not None:
            raise PromptRefused(
                f"This model's maximum context length is {self.max_context} tokens. However, your messages "
                f"are {size} bytes long, which is more than that many tokens. Please reduce the length of the messages.",
                "context_length_exceeded",
            )
        if self._in_flight >= self.max_waiting:
            raise PromptRefused("The server is busy: the request queue is full; retry shortly.", "queue_full", 429)
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._pool, self._render, messages)
            try:
                return await asyncio.wait_for(future, self.timeout)
            except asyncio.TimeoutError:
                raise PromptRefused(
                    f"Rendering the conversation took longer than {self.timeout:g} s; shorten it.", "prompt_too_complex"
                ) from None
            except ValueError as exc:  # the chat template refused the conversation (e.g. role order)
                raise PromptRefused(f"The conversation cannot be rendered: {str(exc)[:300]}", "invalid_messages") from None
            except Exception as exc:  # noqa: BLE001 - jinja errors from a template's raise_exception, etc.
                raise PromptRefused(
                    f"The conversation cannot be rendered: {type(exc).__name__}: {str(exc)[:300]}", "invalid_messages"
                ) from None
        finally:
            self._in_flight -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
