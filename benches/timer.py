#!/usr/bin/env python3
"""Times a command from its start until a marker line appears on its stdout.

    timer.py [--marker TEXT] [--stderr FILE] [--timeout S] -- COMMAND...

Prints one JSON object: {"seconds": time to the marker (or to the exit when no marker is
given), "total": time to the exit, "rc": exit status}. Exits 1 when the command fails, times
out or never prints the marker, so a broken measurement is never mistaken for a slow one.
The command runs in its own process group, which is killed as a whole on timeout.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--marker", default="")
    ap.add_argument("--stderr", default=os.devnull)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")

    seen = {}
    tail = []
    with open(a.stderr, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )

        def watch():
            # Line by line, so the time is taken the moment the marker line arrives.
            for line in proc.stdout:
                if "at" not in seen and a.marker and line.decode(errors="replace").startswith(a.marker):
                    seen["at"] = time.monotonic() - start
                tail.append(line)
                del tail[:-5]

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        # The timeout is enforced from a timer thread so that the wait below can block in
        # waitpid: Popen.wait(timeout=...) polls with sleeps of up to 50 ms, which rounded
        # short exit times up to the next poll.
        timed_out = threading.Event()

        def expire():
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        killer = threading.Timer(a.timeout, expire)
        killer.daemon = True
        killer.start()
        rc = proc.wait()
        total = time.monotonic() - start
        killer.cancel()
        if timed_out.is_set():
            print(f"timer: timed out after {a.timeout:.0f} s: {' '.join(cmd)}", file=sys.stderr)
            return 1
        t.join(timeout=5)

    if a.marker and "at" not in seen:
        out = b"".join(tail).decode(errors="replace")
        print(f"timer: no line starting with {a.marker!r} (rc {rc}); last output:\n{out}", file=sys.stderr)
        return 1
    if rc != 0:
        print(f"timer: exit status {rc}: {' '.join(cmd)}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": round(seen.get("at", total), 4), "total": round(total, 4), "rc": rc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
