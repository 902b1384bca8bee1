"""Request loop for the chaos scripts: GETs URL every INTERVAL seconds until STOPFILE exists (or
DURATION seconds pass), one new connection per request, each bounded by TIMEOUT, and writes one
line per request: start (monotonic s), took (s), outcome (ok / http-NNN / the error kind) and
the body length. "ok" means status 200 and exactly the expected body; "incomplete" an answer
cut before its Content-Length (an error the client sees); "wrong-body" a complete-looking answer
that is not the app's (a silent corruption); "timeout" a request that hung for TIMEOUT. Summarise with `probe.py --summary FILE [FROM TO]`.

Usage: probe.py URL EXPECTED_BODY_FILE INTERVAL DURATION OUT [STOPFILE] [TIMEOUT]
"""
import http.client
import os
import socket
import sys
import time
import urllib.parse


def one(url, expected, timeout):
    u = urllib.parse.urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        c.request("GET", u.path or "/")
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            return "http-%d" % r.status, len(body)
        # Framed complete (Content-Length) but not what the app sent: a silent corruption.
        return ("ok" if body == expected else "wrong-body"), len(body)
    except socket.timeout:
        return "timeout", 0
    except ConnectionRefusedError:
        return "refused", 0
    except ConnectionResetError:
        return "reset", 0
    except http.client.RemoteDisconnected:
        return "closed", 0
    except http.client.IncompleteRead as e:
        # Cut before Content-Length was reached: the client knows it failed (not silent).
        return "incomplete", len(e.partial)
    except OSError as e:
        return "oserror-%s" % (e.errno,), 0
    finally:
        c.close()


def run(url, expected_file, interval, duration, out, stopfile=None, timeout=5.0):
    expected = open(expected_file, "rb").read()
    end = time.monotonic() + duration
    with open(out, "w", buffering=1) as f:
        while time.monotonic() < end and not (stopfile and os.path.exists(stopfile)):
            t0 = time.monotonic()
            outcome, n = one(url, expected, timeout)
            took = time.monotonic() - t0
            f.write("%.4f %.4f %s %d\n" % (t0, took, outcome, n))
            time.sleep(max(0.0, interval - took))


def summary(path, start=None, stop=None):
    rows = []
    for line in open(path):
        t0, took, outcome, _ = line.split()
        t0, took = float(t0), float(took)
        if (start is None or t0 >= start) and (stop is None or t0 < stop):
            rows.append((t0, took, outcome))
    kinds = {}
    for _, _, o in rows:
        kinds[o] = kinds.get(o, 0) + 1
    worst = max((t for _, t, _ in rows), default=0.0)
    # The longest stretch without a success: from the last success before a failure to the
    # first success after it.
    gap, last_ok = 0.0, None
    for t0, took, o in rows:
        if o == "ok":
            if last_ok is not None:
                gap = max(gap, t0 + took - last_ok)
            last_ok = t0 + took
    kinds_s = ",".join("%s=%d" % kv for kv in sorted(kinds.items()))
    print("requests=%d %s slowest=%.3fs longest_gap=%.3fs" % (len(rows), kinds_s, worst, gap))


if __name__ == "__main__":
    a = sys.argv[1:]
    if a and a[0] == "--summary":
        summary(a[1], *(float(x) for x in a[2:4]))
    else:
        run(a[0], a[1], float(a[2]), float(a[3]), a[4], a[5] if len(a) > 5 else None,
            float(a[6]) if len(a) > 6 else 5.0)
