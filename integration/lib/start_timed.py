"""Starts a command and times it from exec to a 200 on a readiness URL (polled every 1 ms over
a raw socket, no client library start-up in the loop); prints "PID MILLISECONDS", leaves the
command running with its output in LOG. Exits 1 (printing "PID timeout") if not ready in time.

Usage: start_timed.py LOG READY_HOST:PORT TIMEOUT_S CMD...
"""
import datetime
import socket
import subprocess
import sys
import time


def ready(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def main():
    log, addr, timeout, cmd = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
    host, port = addr.rsplit(":", 1)
    out = open(log, "ab")
    # The wall-clock exec time in the log, to read the start-up's steps off its timestamps.
    out.write(("%s exec %s\n" % (datetime.datetime.now(datetime.timezone.utc).isoformat(), cmd[-1])).encode())
    out.flush()
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True)
    while time.monotonic() - t0 < timeout:
        if ready(host, int(port)):
            print("%d %.1f" % (p.pid, (time.monotonic() - t0) * 1000))
            return 0
        if p.poll() is not None:
            print("%d exited" % p.pid)
            return 1
        time.sleep(0.001)
    print("%d timeout" % p.pid)
    return 1


if __name__ == "__main__":
    sys.exit(main())
