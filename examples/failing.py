"""An actor with an endpoint that raises: errors reach the caller, the replica stays up."""

from kubeforge import Actor, OverloadedError, endpoint


class Failing(Actor):
    def __init__(self, fail: bool = True) -> None:
        self.fail = fail

    @endpoint
    async def maybe_fail(self, message: str = "boom") -> str:
        if self.fail:
            raise ValueError(message)
        return "ok"

    @endpoint
    async def ping(self) -> str:
        return "pong"

    @endpoint
    async def own_timeout(self) -> None:
        """Raises TimeoutError itself: an endpoint error, not the replica's call timeout."""
        raise TimeoutError("upstream model server timed out")

    @endpoint
    async def raw(self) -> bytes:
        """Bytes: msgpack carries them, JSON cannot."""
        return b"\x00\xff"

    @endpoint
    async def refuse(self) -> None:
        """Raises a retryable kubeforge error of its own (as a nested Service call may): it ran,
        so it is the endpoint's error, never a refusal to re-send."""
        raise OverloadedError("the nested service is at capacity")
