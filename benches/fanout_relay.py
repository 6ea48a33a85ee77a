#!/usr/bin/env python3
"""A TCP relay that counts what a registry sends, listening inside a network namespace.

    fanout_relay.py --listen HOST:PORT --upstream HOST:PORT --stats FILE [--netns PATH]

With --netns (a /run/netns/NAME file), the listening socket is made inside that namespace
and the process then returns to its own, so clients on a private network reach a registry
that runs on this namespace's loopback. Every accepted connection is joined to a new
connection to UPSTREAM and bytes pass unchanged in both directions.

FILE gets, at most every 100 ms and whenever something changed, a JSON object: bytes sent
to clients ("down"), bytes from clients ("up"), connections, and the request lines seen
("GET /v2/...": counted from the start of each read, which is where HTTP/1.1 clients put
them). Runs until killed; the file is written once more on SIGTERM.
"""

import argparse
import asyncio
import ctypes
import json
import os
import re
import signal
import socket

CLONE_NEWNET = 0x40000000
CHUNK = 256 * 1024
REQUEST = re.compile(rb"^(GET|HEAD) (\S+) HTTP/1\.[01]\r?\n", re.M)

stats = {"down": 0, "up": 0, "connections": 0, "requests": {}}
dirty = True


def setns(path):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def listener(host, port, netns):
    """A listening socket, made inside `netns` when given."""
    home = "/proc/self/ns/net"
    if netns:
        own = os.open(home, os.O_RDONLY)
        setns(netns)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(256)
        s.setblocking(False)
        return s
    finally:
        if netns:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
            os.close(own)


async def pump(reader, writer, key):
    global dirty
    try:
        while data := await reader.read(CHUNK):
            stats[key] += len(data)
            if key == "up":
                for m in REQUEST.finditer(data):
                    line = f"{m[1].decode()} {m[2].decode(errors='replace')}"
                    stats["requests"][line] = stats["requests"].get(line, 0) + 1
            dirty = True
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def handle(cr, cw, uhost, uport):
    global dirty
    stats["connections"] += 1
    dirty = True
    try:
        ur, uw = await asyncio.open_connection(uhost, uport)
    except OSError:
        cw.close()
        return
    try:
        await asyncio.gather(pump(cr, uw, "up"), pump(ur, cw, "down"))
    finally:
        for w in (cw, uw):
            try:
                w.close()
            except OSError:
                pass


def write_stats(path):
    global dirty
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)
    dirty = False


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--stats", required=True)
    ap.add_argument("--netns", default="")
    a = ap.parse_args()
    lhost, lport = a.listen.rsplit(":", 1)
    uhost, uport = a.upstream.rsplit(":", 1)
    sock = listener(lhost, int(lport), a.netns)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await asyncio.start_server(lambda r, w: handle(r, w, uhost, int(uport)), sock=sock)
    write_stats(a.stats)
    async with server:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
            if dirty:
                write_stats(a.stats)
    write_stats(a.stats)


if __name__ == "__main__":
    asyncio.run(main())
