#!/usr/bin/env python3
"""Measuring half of tests/bench/readiness.sh: drives one `food` under keepup-agent and one
under systemd through CYCLES start/ready/watchdog-miss/restart cycles, alternating between
the two, and reports medians and p90s side by side.

Every stamp is CLOCK_MONOTONIC (one kernel: the systemd container shares the host's clock):
  * food --notify-log: `start`, `ready` (right before READY=1), `watchdog` (right before each
    WATCHDOG=1), `watchdog-stop` (pings stopped because the stop file exists);
  * keepup: the moment this helper, blocked in inotify on the service log, reads the agent's
    `ready (READY=1) after ...` line (written when the service becomes `running`);
  * systemd: the unit's ActiveEnterTimestampMonotonic (set when it becomes `active`).

  bench.py run OUT.json CYCLES KEEPUP_FOOD_DIR KEEPUP_LOG CONTAINER SYSTEMD_DIR UNIT WATCHDOG_MS
  bench.py report OUT.json [--json]
"""

import ctypes
import json
import os
import select
import statistics
import subprocess
import sys
import threading
import time

IN_MODIFY = 0x2
READY_LINE = "keepup-agent: ready (READY=1)"


def now():
    return time.monotonic_ns()


class Stamps:
    """food's --notify-log, read as it grows."""

    def __init__(self, path):
        self.path = path
        self.lines = []
        self.offset = 0

    def poll(self):
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind("\n") + 1
        self.offset += len(data[:end].encode())
        for line in data[:end].splitlines():
            what, _real, mono = line.split()
            self.lines.append((what, int(mono)))

    def wait_for(self, what, after_index, timeout_s):
        """Index of the first `what` line at or after after_index."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.poll()
            for i in range(after_index, len(self.lines)):
                if self.lines[i][0] == what:
                    return i
            time.sleep(0.002)
        raise SystemExit(f"readiness bench: no `{what}` in {self.path} within {timeout_s}s "
                         f"(last lines: {self.lines[-5:]})")


class LogWatch:
    """inotify on keepup's service log, on a thread of its own: stamps each wakeup that reads
    a ready line (so a run that becomes ready while the other supervisor's cycle runs is
    stamped all the same)."""

    def __init__(self, path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise SystemExit("readiness bench: inotify_init1 failed")
        if self.libc.inotify_add_watch(self.fd, path.encode(), IN_MODIFY) < 0:
            raise SystemExit(f"readiness bench: cannot watch {path}")
        self.f = open(path, "rb")
        self.f.seek(0, 2)
        self.seen = []
        self.lock = threading.Lock()
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while True:
            select.select([self.fd], [], [])
            try:
                os.read(self.fd, 65536)
            except BlockingIOError:
                pass
            data = self.f.read().decode(errors="replace")
            # Stamped after the read that found the line: a stamp taken before it could
            # precede a READY=1 sent meanwhile (the wakeup was for an earlier line).
            t = now()
            for _ in range(data.count(READY_LINE)):
                with self.lock:
                    self.seen.append(t)

    def ready_after(self, t0, timeout_s):
        """The first ready line read after monotonic time t0 (ns)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self.lock:
                later = [t for t in self.seen if t > t0]
            if later:
                return later[0]
            time.sleep(0.01)
        raise SystemExit("readiness bench: keepup-agent logged no `ready (READY=1)` line")


def systemctl(container, *args):
    out = subprocess.run(["docker", "exec", container, "systemctl", *args],
                         capture_output=True, text=True, timeout=60)
    return out.stdout


def unit_props(container, unit):
    out = systemctl(container, "show", "-p", "ActiveState", "-p",
                    "ActiveEnterTimestampMonotonic", "-p", "NRestarts", unit)
    return dict(l.split("=", 1) for l in out.splitlines() if "=" in l)


def cycle(stamps, i, stop_file, watchdog_ns, ready_at):
    """One cycle of the run whose `start` is line i: it sends READY=1 (ready_at(mono) says
    when the supervisor marked it ready), then its pings stop, and the restart is awaited.
    Returns (ready_ms, restart_ms, the next run's start line)."""
    r = stamps.wait_for("ready", i, 30)
    ready_ms = None if ready_at is None else (ready_at(stamps.lines[r][1]) - stamps.lines[r][1]) / 1e6
    # A run of >= 1 s (keepup's fast_crash) then at least one ping: then stop the pings.
    time.sleep(1.2)
    stamps.wait_for("watchdog", r, 30)
    open(stop_file, "w").close()
    s = stamps.wait_for("watchdog-stop", r, 30)
    pings = [m for (w, m) in stamps.lines[r:s] if w == "watchdog"]
    last = pings[-1] if pings else stamps.lines[r][1]
    n = stamps.wait_for("start", s, 30)
    os.unlink(stop_file)
    restart_ms = (stamps.lines[n][1] - (last + watchdog_ns)) / 1e6
    return ready_ms, restart_ms, n


def run(out, cycles, kdir, klog, container, sdir, unit, watchdog_ms):
    watchdog_ns = watchdog_ms * 1_000_000
    k_stamps = Stamps(os.path.join(kdir, "notify.log"))
    s_stamps = Stamps(os.path.join(sdir, "notify.log"))
    log = LogWatch(klog)

    def k_ready(t0):
        return log.ready_after(t0, 30)

    def s_ready(_t0):
        end = time.monotonic() + 30
        while time.monotonic() < end:
            p = unit_props(container, unit)
            if p.get("ActiveState") == "active":
                return int(p["ActiveEnterTimestampMonotonic"]) * 1000
            time.sleep(0.05)
        raise SystemExit(f"readiness bench: {unit} did not become active")

    res = {"cycles": cycles, "watchdog_ms": watchdog_ms,
           "keepup": {"ready_ms": [], "restart_ms": []},
           "systemd": {"ready_ms": [], "restart_ms": []}}
    at = {"keepup": k_stamps.wait_for("start", 0, 30), "systemd": s_stamps.wait_for("start", 0, 30)}
    # Cycle 0 warms up and is not counted (keepup's first READY=1 may precede the watch).
    for c in range(cycles + 1):
        for name, stamps, stop, ready_at in (
                ("keepup", k_stamps, os.path.join(kdir, "stop-watchdog"), k_ready),
                ("systemd", s_stamps, os.path.join(sdir, "stop-watchdog"), s_ready)):
            ready_ms, restart_ms, at[name] = cycle(
                stamps, at[name], stop, watchdog_ns, ready_at if c > 0 else None)
            if c == 0:
                continue
            res[name]["ready_ms"].append(ready_ms)
            res[name]["restart_ms"].append(restart_ms)
        if c == 0:
            continue
        print(f"[readiness-bench] cycle {c}/{cycles}: "
              f"keepup {res['keepup']['ready_ms'][-1]:.2f} / {res['keepup']['restart_ms'][-1]:.1f} ms, "
              f"systemd {res['systemd']['ready_ms'][-1]:.2f} / {res['systemd']['restart_ms'][-1]:.1f} ms",
              file=sys.stderr, flush=True)
    res["systemd"]["restarts"] = unit_props(container, unit).get("NRestarts")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def report(path, as_json):
    res = json.load(open(path))
    rows = []
    for key, what in (("ready_ms", "READY=1 -> running/active"),
                      ("restart_ms", f"missed watchdog ({res['watchdog_ms']} ms) -> restart exec")):
        k, s = res["keepup"][key], res["systemd"][key]
        row = {"measure": what, "keepup_median_ms": statistics.median(k),
               "keepup_p90_ms": pct(k, 0.9), "systemd_median_ms": statistics.median(s),
               "systemd_p90_ms": pct(s, 0.9)}
        row["ratio_median"] = row["keepup_median_ms"] / row["systemd_median_ms"]
        rows.append(row)
    if as_json:
        print(json.dumps({"cycles": res["cycles"], "rows": rows}, indent=1))
        return
    print(f"readiness bench: {res['cycles']} cycles per supervisor, interleaved")
    print(f"{'measure':<42} {'keepup med':>10} {'p90':>8} {'systemd med':>11} {'p90':>8} {'keepup/systemd':>14}")
    for r in rows:
        print(f"{r['measure']:<42} {r['keepup_median_ms']:>10.2f} {r['keepup_p90_ms']:>8.2f} "
              f"{r['systemd_median_ms']:>11.2f} {r['systemd_p90_ms']:>8.2f} {r['ratio_median']:>13.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 10 and sys.argv[1] == "run":
        a = sys.argv[2:]
        run(a[0], int(a[1]), a[2], a[3], a[4], a[5], a[6], int(a[7]))
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3:] == ["--json"])
    else:
        sys.exit(__doc__)
