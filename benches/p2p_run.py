#!/usr/bin/env python3
"""Runs one download command and reports its time, its CPU time and when its data had landed.

    p2p_run.py [--watch FILE --size N] [--stderr FILE] [--timeout S] -- COMMAND...

Prints one JSON object:
  seconds      wall time from start to exit
  cpu_user, cpu_sys   CPU seconds of the command and everything it waited for (getrusage of
               the children; nsenter execs the command, so this is the command itself)
  max_rss_kib  peak resident set of the largest child
  appeared     (with --watch) seconds until FILE first existed: for fd, when the layer
               transfer began (after start-up, peer connection and the tag, manifest and config)
  landed       (with --watch) seconds until FILE first reached N bytes: for fd, the moment the
               whole layer blob is in its download file, before the two views are built;
               null if the file was never seen at full size
Exits 1 if the command fails or times out. FILE is polled every 10 ms (one stat each time).
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--watch", default="")
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--stderr", default=os.devnull)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command")

    landed = {}
    done = threading.Event()

    def watch(start):
        while not done.is_set():
            try:
                st = os.stat(a.watch)
                landed.setdefault("appeared", time.monotonic() - start)
                if st.st_size >= a.size:
                    landed["at"] = time.monotonic() - start
                    return
            except OSError:
                pass
            time.sleep(0.01)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(a.stderr, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
        )
        t = None
        if a.watch:
            t = threading.Thread(target=watch, args=(start,), daemon=True)
            t.start()
        try:
            rc = proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            print(f"p2p_run: timed out after {a.timeout:.0f} s: {' '.join(cmd)}", file=sys.stderr)
            return 1
        seconds = time.monotonic() - start
        done.set()
        if t:
            t.join(timeout=1)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        print(f"p2p_run: exit status {rc}: {' '.join(cmd)}", file=sys.stderr)
        return 1
    out = {
        "seconds": round(seconds, 4),
        "cpu_user": round(after.ru_utime - before.ru_utime, 3),
        "cpu_sys": round(after.ru_stime - before.ru_stime, 3),
        "max_rss_kib": after.ru_maxrss,
    }
    if a.watch:
        for k, name in (("appeared", "appeared"), ("at", "landed")):
            out[name] = round(landed[k], 4) if k in landed else None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
