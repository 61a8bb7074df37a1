"""A no-op actor: the cheapest possible endpoint, for overhead benchmarks."""

from kubeforge import Actor, endpoint


class Echo(Actor):
    @endpoint
    async def echo(self, value: object = None) -> object:
        return value

    @endpoint
    def echo_sync(self, value: object = None) -> object:
        return value
