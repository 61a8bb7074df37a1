"""A lean HTTP/1.1 layer on asyncio protocols and httptools (llhttp), for the call path.

aiohttp costs tens of microseconds per request in its own machinery; on a two-core box that is
the difference between a router that keeps up with nginx and one that does not. This layer does
only what kubeforge's protocol needs: keep-alive, pipelining in order, Content-Length and chunked
request bodies, `Expect: 100-continue`, body limits, and pooled upstream connections.
"""
