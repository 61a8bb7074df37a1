"""A stateful actor: each replica counts on its own, so stickiness shows in the numbers."""

import os

from kubeforge import Actor, endpoint


class Counter(Actor):
    def __init__(self, start: int = 0) -> None:
        self.n = start
        self.ended_sessions: list[str] = []

    @endpoint
    async def incr(self, by: int = 1) -> int:
        self.n += by
        return self.n

    @endpoint
    async def value(self) -> int:
        return self.n

    @endpoint
    async def whoami(self) -> dict[str, object]:
        """Which replica answered: its name and process id."""
        return {"replica": os.environ.get("KUBEFORGE_REPLICA_NAME", ""), "pid": os.getpid()}

    @endpoint
    async def ended(self) -> list[str]:
        """Session ids this replica was told have ended."""
        return self.ended_sessions

    async def on_session_end(self, session_id: str) -> None:
        self.ended_sessions.append(session_id)
