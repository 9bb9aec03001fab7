#!/usr/bin/env python3
"""Measurement helper for tests/bench/supervise.sh (standard library only).

Subcommands:
  wait-up DIR N TIMEOUT          wait until copies 01..N in stamp dir DIR each have a live
                                 service (last stamp's pid alive and no longer the shell)
  sample KIND ROOTPID            one JSON line: RSS/PSS and CPU of the supervision processes
                                 (keepup/supervisord: ROOTPID; runit: runsvdir ROOTPID + its
                                 runsv children)
  idle OUT SECS KIND=PID ...     sample all, sleep SECS, sample again; JSON to OUT
  kills OUT KILLS PACE_MS MIN_RUN_MS SUP=DIR ...
                                 SIGKILL supervised services round-robin across supervisors
                                 and copies; restart latency = next stamp - kill time
  floor OUT N SCRIPT STAMPFILE   spawn SCRIPT directly N times: spawn -> stamp (no supervisor)
  report RESULTS_DIR             print the table and the targets

A stamp file has one line per exec of a launch script: "<pid> <date +%s%N>".
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read(path):
    with open(path) as f:
        return f.read()


def stamps(path):
    try:
        text = read(path)
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((int(parts[0]), int(parts[1])))
    return out


def comm(pid):
    try:
        return read(f"/proc/{pid}/comm").strip()
    except OSError:
        return None


def alive(pid):
    try:
        st = read(f"/proc/{pid}/stat")
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in read(f"/proc/{pid}/task/{tid}/children").split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def supervision_pids(kind, root):
    pids = [root]
    if kind == "runit":
        pids += [c for c in children(root) if comm(c) == "runsv"]
    return pids


def proc_sample(pid):
    stat = read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    # fields after ")" start at field 3 (state); utime=14, stime=15, cutime=16, cstime=17
    utime, stime, cutime, cstime = (int(stat[i - 3]) for i in (14, 15, 16, 17))
    rss = pss = 0
    for line in read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    sched_ns = 0
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    for tid in tids:
        try:
            sched_ns += int(read(f"/proc/{pid}/task/{tid}/schedstat").split()[0])
        except OSError:
            pass
    return {
        "pid": pid,
        "rss_kb": rss,
        "pss_kb": pss,
        "ticks": utime + stime,
        "child_ticks": cutime + cstime,
        "sched_ns": sched_ns,
        "tids": tids,
    }


def sample(kind, root):
    procs = [proc_sample(p) for p in supervision_pids(kind, root)]
    return {
        "kind": kind,
        "time": time.monotonic(),
        "nprocs": len(procs),
        "rss_kb": sum(p["rss_kb"] for p in procs),
        "pss_kb": sum(p["pss_kb"] for p in procs),
        "ticks": sum(p["ticks"] for p in procs),
        "child_ticks": sum(p["child_ticks"] for p in procs),
        "sched_ns": sum(p["sched_ns"] for p in procs),
        "tasks": {str(p["pid"]): p["tids"] for p in procs},
    }


def cmd_wait_up(d, n, timeout):
    deadline = time.monotonic() + float(timeout)
    names = [f"{i:02d}" for i in range(1, int(n) + 1)]
    while True:
        missing = []
        for name in names:
            s = stamps(os.path.join(d, name))
            if not s or not alive(s[-1][0]) or comm(s[-1][0]) in ("sh", "dash", "setpriv", None):
                missing.append(name)
        if not missing:
            return 0
        if time.monotonic() > deadline:
            print(f"not up after {timeout}s in {d}: {' '.join(missing)}", file=sys.stderr)
            return 1
        time.sleep(0.1)


def thread_cpu(kind, root, track, first_poll):
    """Record every thread's schedstat run time (ns) in `track[(pid, tid)] = [first, last]`.

    A thread seen at the first poll starts from its value then; one that appears later was
    born during the window and counts from 0. A thread that exits keeps its last value, so
    only its run time after the last poll (its exit path) is missed; tokio's blocking-pool
    threads exit only after 10 s idle, so that is next to nothing.
    """
    for pid in supervision_pids(kind, root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                ns = int(read(f"/proc/{pid}/task/{tid}/schedstat").split()[0])
            except (OSError, ValueError, IndexError):
                continue
            key = (pid, int(tid))
            if key in track:
                track[key][1] = ns
            else:
                track[key] = [ns if first_poll else 0, ns]


def cmd_idle(out, secs, specs, poll=0.2):
    pairs = [(k, int(p)) for k, p in (s.split("=", 1) for s in specs)]
    secs = float(secs)
    before = {k: sample(k, p) for k, p in pairs}
    track = {k: {} for k, _ in pairs}
    t0 = time.monotonic()
    first = True
    while True:
        for k, p in pairs:
            thread_cpu(k, p, track[k], first)
        first = False
        left = t0 + secs - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(poll, left))
    after = {k: sample(k, p) for k, p in pairs}
    res = {}
    for k, _ in pairs:
        b, a = before[k], after[k]
        span = a["time"] - b["time"]
        res[k] = {
            "secs": span,
            "cpu_ms_per_min": sum(l - f for f, l in track[k].values()) / 1e6 * 60 / span,
            "ticks_ms_per_min": (a["ticks"] - b["ticks"]) * 1000 / CLK_TCK * 60 / span,
            "child_ticks_ms_per_min": (a["child_ticks"] - b["child_ticks"])
            * 1000 / CLK_TCK * 60 / span,
            "threads_seen": len(track[k]),
            "threads_end": sum(len(t) for t in a["tasks"].values()),
            "rss_kb": a["rss_kb"],
            "pss_kb": a["pss_kb"],
            "nprocs": a["nprocs"],
        }
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


def pct(sorted_vals, p):
    """Nearest-rank percentile."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, -(-len(sorted_vals) * p // 100) - 1))
    return sorted_vals[int(k)]


def summarize(lat_ns, missing):
    ms = sorted(x / 1e6 for x in lat_ns)
    return {
        "n": len(ms),
        "missing": missing,
        "median_ms": statistics.median(ms) if ms else None,
        "p99_ms": pct(ms, 99),
        "min_ms": ms[0] if ms else None,
        "max_ms": ms[-1] if ms else None,
    }


def cmd_kills(out, kills, pace_ms, min_run_ms, specs):
    """Kill services one at a time, at least PACE_MS apart, round-robin over the supervisors.

    A supervisor gets its next kill only once the previous one's restart has been seen (so
    each restart is measured on its own, not woken by the next kill), and each copy is killed
    only after running for MIN_RUN_MS (no fast-crash backoff).
    """
    kills, pace, min_run = int(kills), float(pace_ms) / 1000, int(min_run_ms) * 1_000_000
    sups = [s.split("=", 1) for s in specs]
    copies = {sup: sorted(n for n in os.listdir(d) if n.isdigit()) for sup, d in sups}
    pending = {sup: None for sup, _ in sups}  # (copy, stamp index) whose restart we await
    pending_since = {sup: 0.0 for sup, _ in sups}
    records = {sup: [] for sup, _ in sups}  # (copy, t_kill, stamp index)
    nxt = {sup: 0 for sup, _ in sups}
    done = {sup: 0 for sup, _ in sups}
    turn = 0
    last_kill = 0.0
    last_progress = time.monotonic()

    def ready(sup, d):
        """The next copy of `sup` to kill, or None."""
        if pending[sup] is not None:
            c, idx = pending[sup]
            if len(stamps(os.path.join(d, c))) > idx:
                pending[sup] = None
            elif time.monotonic() - pending_since[sup] > 30:
                raise SystemExit(f"{sup}: copy {c} not restarted 30 s after its kill")
            else:
                return None
        if done[sup] >= kills:
            return None
        for k in range(len(copies[sup])):
            c = copies[sup][(nxt[sup] + k) % len(copies[sup])]
            s = stamps(os.path.join(d, c))
            if not s:
                continue
            pid, ts = s[-1]
            if time.time_ns() - ts < min_run or not alive(pid):
                continue
            if comm(pid) in ("sh", "dash", "setpriv"):
                continue
            return (k, c, pid, len(s))
        return None

    while any(done[s] < kills or pending[s] is not None for s, _ in sups):
        wait = last_kill + pace - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        killed = False
        for j in range(len(sups)):
            sup, d = sups[(turn + j) % len(sups)]
            picked = ready(sup, d)
            if picked is None:
                continue
            k, c, pid, n = picked
            nxt[sup] = (nxt[sup] + k + 1) % len(copies[sup])
            t0 = time.time_ns()
            os.kill(pid, signal.SIGKILL)
            last_kill = time.monotonic()
            records[sup].append((c, t0, n))
            pending[sup] = (c, n)
            pending_since[sup] = last_kill
            done[sup] += 1
            turn = (turn + j + 1) % len(sups)
            killed = True
            break
        if not killed:
            time.sleep(0.002)
        if time.monotonic() - last_progress > 15:
            last_progress = time.monotonic()
            print("  kills: " + ", ".join(f"{s} {done[s]}/{kills}" for s, _ in sups),
                  file=sys.stderr)
    res = {}
    for sup, d in sups:
        lat, missing = [], 0
        for c, t0, idx in records[sup]:
            s = stamps(os.path.join(d, c))
            if len(s) > idx:
                lat.append(s[idx][1] - t0)
            else:
                missing += 1
        res[sup] = summarize(lat, missing)
        res[sup]["latencies_ms"] = [x / 1e6 for x in lat]
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


def cmd_floor(out, n, script, stampfile):
    lat = []
    for _ in range(int(n)):
        before = len(stamps(stampfile))
        t0 = time.time_ns()
        subprocess.run([script], check=True, stdin=subprocess.DEVNULL)
        s = stamps(stampfile)
        if len(s) > before:
            lat.append(s[before][1] - t0)
        time.sleep(0.02)
    with open(out, "w") as f:
        json.dump(summarize(lat, int(n) - len(lat)), f, indent=1)
    return 0


def fmt(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"


def cmd_report(d):
    def load(name):
        p = os.path.join(d, name)
        return json.load(open(p)) if os.path.exists(p) else {}

    idle, kills, floor = load("idle.json"), load("kills.json"), load("floor.json")
    tcp, exe = load("idle-tcp.json"), load("idle-exec.json")
    rows = [
        ("keepup-agent", idle.get("keepup"), kills.get("keepup")),
        ("runit", idle.get("runit"), kills.get("runit")),
        ("supervisord", idle.get("supervisord"), kills.get("supervisord")),
        ("keepup-agent, tcp probes/10s", tcp.get("keepup"), None),
        ("keepup-agent, exec probes/10s", exe.get("keepup"), None),
        ("floor (no supervisor)", None, floor or None),
    ]
    hdr = ("supervisor", "procs", "RSS MiB", "PSS MiB", "idle CPU ms/min",
           "(stat ticks)", "restart median ms", "p99 ms", "max ms", "kills")
    table = []
    for name, i, k in rows:
        if i is None and k is None:
            continue
        i = i or {}
        k = k or {}
        table.append((
            name,
            str(i.get("nprocs", "-")),
            fmt(i["rss_kb"] / 1024 if i else None),
            fmt(i["pss_kb"] / 1024 if i else None),
            fmt(i.get("cpu_ms_per_min"), 2),
            fmt(i.get("ticks_ms_per_min"), 0),
            fmt(k.get("median_ms"), 2),
            fmt(k.get("p99_ms"), 2),
            fmt(k.get("max_ms"), 2),
            "-" if not k else f"{k['n']}" + (f" ({k['missing']} lost)" if k.get("missing") else ""),
        ))
    widths = [max(len(r[j]) for r in table + [hdr]) for j in range(len(hdr))]

    def line(r):
        return "| " + " | ".join(
            c.ljust(widths[j]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)) + " |"

    print(line(hdr))
    print("|" + "|".join("-" * (w + 1) + ":" if j else "-" * (w + 2)
                         for j, w in enumerate(widths)) + "|")
    for r in table:
        print(line(r))
    for name, i in (("keepup-agent", idle.get("keepup")), ("with tcp probes", tcp.get("keepup")),
                    ("with exec probes", exe.get("keepup"))):
        if i and i.get("threads_seen", 1) > i.get("threads_end", 1):
            print(f"  ({name}: {i['threads_seen']} threads ran in the window, "
                  f"{i['threads_end']} at its end: blocking-pool threads came and went)")
    for name, i in (("tcp", tcp.get("keepup")), ("exec", exe.get("keepup"))):
        if i and i.get("child_ticks_ms_per_min"):
            print(f"  ({name} probes: reaped children used {i['child_ticks_ms_per_min']:.0f} "
                  "ms/min more, stat ticks)")
    print()

    ku, ru = idle.get("keepup"), idle.get("runit")
    kk, rk = kills.get("keepup"), kills.get("runit")
    targets = []
    if ku:
        targets.append(("keepup-agent RSS < 8 MiB", f"{ku['rss_kb'] / 1024:.1f} MiB",
                        ku["rss_kb"] < 8 * 1024))
    if ku and ru:
        targets.append(("keepup-agent PSS <= 1.5 x runit PSS",
                        f"{ku['pss_kb'] / 1024:.1f} vs {1.5 * ru['pss_kb'] / 1024:.1f} MiB",
                        ku["pss_kb"] <= 1.5 * ru["pss_kb"]))
        targets.append(("keepup-agent idle CPU (no probes) <= runit",
                        f"{ku['cpu_ms_per_min']:.2f} vs {ru['cpu_ms_per_min']:.2f} ms/min",
                        ku["cpu_ms_per_min"] <= ru["cpu_ms_per_min"]))
    if kk and rk and kk["median_ms"] is not None and rk["median_ms"] is not None:
        targets.append(("keepup-agent restart median <= runit",
                        f"{kk['median_ms']:.2f} vs {rk['median_ms']:.2f} ms",
                        kk["median_ms"] <= rk["median_ms"]))
    tw = max(len(t[0]) for t in targets) if targets else 0
    mw = max(len(t[1]) for t in targets) if targets else 0
    print("| " + "target".ljust(tw) + " | " + "measured".rjust(mw) + " | verdict |")
    print("|" + "-" * (tw + 2) + "|" + "-" * (mw + 1) + ":|---------|")
    for t, m, ok in targets:
        print(f"| {t.ljust(tw)} | {m.rjust(mw)} | {'PASS' if ok else 'MISS':7} |")
    misses = sum(1 for t in targets if not t[2])
    return 3 if misses else 0


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "wait-up":
        return cmd_wait_up(*args)
    if cmd == "sample":
        print(json.dumps(sample(args[0], int(args[1]))))
        return 0
    if cmd == "idle":
        return cmd_idle(args[0], args[1], args[2:])
    if cmd == "kills":
        return cmd_kills(*args[:4], args[4:])
    if cmd == "floor":
        return cmd_floor(*args)
    if cmd == "report":
        return cmd_report(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
