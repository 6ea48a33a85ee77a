#!/usr/bin/env python3
"""A TCP relay that adds delay, because this kernel has no netem.

    relay.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT DELAY_MS

Every connection accepted on LISTEN is joined to a new connection to UPSTREAM. Data going back
from the upstream to the client is held for DELAY_MS after it was read, then written in order;
data going up is passed at once. So each request/response round trip grows by DELAY_MS, as
with netem on the server's egress, and the link's rate limit (tc on the veths) still applies.
Runs until killed.
"""

import asyncio
import sys
import time

CHUNK = 64 * 1024


async def pump(reader, writer, delay):
    # Reading and writing are separate tasks joined by a queue, so a held chunk does not stop
    # the next one from being read: the delay is added once, not once per chunk.
    q = asyncio.Queue(maxsize=1024)

    async def read_side():
        try:
            while True:
                data = await reader.read(CHUNK)
                await q.put((time.monotonic(), data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await q.put((time.monotonic(), b""))

    async def write_side():
        try:
            while True:
                t, data = await q.get()
                wait = t + delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return

    await asyncio.gather(read_side(), write_side())


async def handle(client_r, client_w, up_host, up_port, delay):
    try:
        up_r, up_w = await asyncio.open_connection(up_host, up_port)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(pump(client_r, up_w, 0.0), pump(up_r, client_w, delay))
    finally:
        for w in (client_w, up_w):
            try:
                w.close()
            except OSError:
                pass


async def main():
    lhost, lport = sys.argv[1].rsplit(":", 1)
    uhost, uport = sys.argv[2].rsplit(":", 1)
    delay = float(sys.argv[3]) / 1000.0
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, uhost, int(uport), delay), lhost, int(lport), reuse_address=True
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
