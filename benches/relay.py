#!/usr/bin/env python3
"""A TCP or UDP relay that adds delay, because this kernel has no netem.

    relay.py LISTEN_HOST:PORT UPSTREAM_HOST:PORT DELAY_MS
    relay.py --udp LISTEN_HOST:PORT UPSTREAM_HOST:PORT DELAY_MS

TCP (the default): every connection accepted on LISTEN is joined to a new connection to
UPSTREAM. Data going back from the upstream to the client is held for DELAY_MS after it was
read, then written in order; data going up is passed at once. So each request/response round
trip grows by DELAY_MS, as with netem on the server's egress, and the link's rate limit (tc on
the veths) still applies.

UDP (--udp, for QUIC): each client source address gets its own upstream socket, so the
upstream sees one peer per client. Datagrams from a client go up at once; datagrams coming
back are held for DELAY_MS after they arrived, then sent to that client from LISTEN, in order.
Nothing is dropped on purpose; a full socket buffer drops as a real link would. On SIGTERM or
SIGINT the UDP relay writes its counters as one JSON line to stderr before it exits.

Runs until killed.
"""

import asyncio
import collections
import errno
import json
import selectors
import signal
import socket
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


def big_buffers(sock):
    # QUIC sends bursts of datagrams; a small receive buffer would drop them in the relay
    # rather than on the rate-limited link. As root the FORCE options pass the sysctl cap.
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, 8 << 20)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, 8 << 20)
            except OSError:
                pass


def udp_main(listen, upstream, delay):
    lhost, lport = listen.rsplit(":", 1)
    uhost, uport = upstream.rsplit(":", 1)
    up_addr = (socket.gethostbyname(uhost), int(uport))
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind((lhost, int(lport)))
    front.setblocking(False)
    big_buffers(front)
    sel = selectors.DefaultSelector()
    sel.register(front, selectors.EVENT_READ, None)
    ups = {}  # client address -> its upstream socket
    held = collections.deque()  # (due time, client address, datagram), in arrival order
    stats = {"clients": 0, "up_datagrams": 0, "up_bytes": 0, "down_datagrams": 0,
             "down_bytes": 0, "send_errors": 0}

    class Stop(Exception):
        pass

    def on_signal(*_):
        # Raising (rather than setting a flag) also ends a select that would wait forever.
        raise Stop

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def send(sock, data, addr=None):
        # addr None: the socket is connected to the upstream.
        out = (lambda: sock.send(data)) if addr is None else (lambda: sock.sendto(data, addr))
        try:
            out()
        except BlockingIOError:
            # The send buffer is full: wait for room rather than drop, so the relay itself
            # does not lose datagrams the link would have carried.
            sock.setblocking(True)
            try:
                out()
            except OSError:
                stats["send_errors"] += 1
            sock.setblocking(False)
        except OSError:
            stats["send_errors"] += 1

    try:
        relay_loop(sel, front, ups, held, stats, send, up_addr, delay)
    except Stop:
        pass
    print(json.dumps(stats), file=sys.stderr, flush=True)


def relay_loop(sel, front, ups, held, stats, send, up_addr, delay):
    while True:
        timeout = None
        if held:
            timeout = max(0.0, held[0][0] - time.monotonic())
        try:
            events = sel.select(timeout)
        except InterruptedError:
            continue
        for key, _ in events:
            sock, client = key.fileobj, key.data
            # Drain each ready socket, so one wake-up handles a whole burst.
            for _ in range(256):
                try:
                    data, addr = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    # An ICMP error from a previous send (port unreachable) shows up here.
                    if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        continue
                    raise
                if client is None:
                    up = ups.get(addr)
                    if up is None:
                        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        up.setblocking(False)
                        big_buffers(up)
                        up.connect(up_addr)
                        sel.register(up, selectors.EVENT_READ, addr)
                        ups[addr] = up
                        stats["clients"] += 1
                    stats["up_datagrams"] += 1
                    stats["up_bytes"] += len(data)
                    send(up, data)
                else:
                    stats["down_datagrams"] += 1
                    stats["down_bytes"] += len(data)
                    held.append((time.monotonic() + delay, client, data))
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, client, data = held.popleft()
            send(front, data, client)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--udp":
        udp_main(sys.argv[2], sys.argv[3], float(sys.argv[4]) / 1000.0)
    elif len(sys.argv) == 4:
        asyncio.run(main())
    else:
        sys.exit(__doc__)
