"""One conversation per browser session, dropped when the tab closes or after it has been idle too long, so that
the server's memory (a ChatSession's KV cache and image features) stays bounded by the sessions in use."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class SessionStore:
    """Conversations by session id, made on first use by `new_conversation()`.

    `expire_idle()` drops every conversation unused for `idle_timeout` seconds that is not answering right now;
    `start_sweeper()` runs it in a daemon thread every `idle_timeout / 4` seconds (at least every 60 s).
    """

    def __init__(
        self, new_conversation: Callable[[], Any], idle_timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {idle_timeout!r}")
        self._new = new_conversation
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._conversations: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sweeper: threading.Thread | None = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._conversations)

    def get(self, session_id: str) -> Any:
        with self._lock:
            conversation = self._conversations.get(session_id)
            if conversation is None:
                conversation = self._conversations[session_id] = self._new()
            conversation.last_used = self._clock()
            return conversation

    def conversations(self) -> list[Any]:
        """The conversations held now."""
        with self._lock:
            return list(self._conversations.values())

    def find(self, session_id: str) -> Any | None:
        with self._lock:
            return self._conversations.get(session_id)

    def touch(self, session_id: str) -> None:
        """Mark the conversation used now (an answer just ended), if it is still held."""
        with self._lock:
            conversation = self._conversations.get(session_id)
            if conversation is not None:
                conversation.last_used = self._clock()

    def drop(self, session_id: str) -> None:
        with self._lock:
            conversation = self._conversations.pop(session_id, None)
        if conversation is not None:
            conversation.close()

    def expire_idle(self, now: float | None = None) -> int:
        """Drop the conversations idle for longer than `idle_timeout` at `now` (default: the clock's time); returns
        how many were dropped."""
        now = self._clock() if now is None else now
        with self._lock:
            idle = [
                session_id
                for session_id, conversation in self._conversations.items()
                if now - conversation.last_used > self.idle_timeout and not conversation.busy
            ]
            dropped = [self._conversations.pop(session_id) for session_id in idle]
        for conversation in dropped:
            conversation.close()
        return len(dropped)

    def start_sweeper(self) -> None:
        if self._sweeper is not None:
            return
        interval = min(self.idle_timeout / 4, 60.0)

        def sweep() -> None:
            while not self._closed.wait(interval):
                self.expire_idle()

        self._sweeper = threading.Thread(target=sweep, name="nvlm_d-web-sessions", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Stop the sweeper and drop every conversation."""
        self._closed.set()
        with self._lock:
            conversations = list(self._conversations.values())
            self._conversations.clear()
        for conversation in conversations:
            conversation.close()
