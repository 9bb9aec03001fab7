//! The table form's rows (`keepup report`), rendered straight from the hosts' summaries and
//! kept in them between reports.
//!
//! What a host's rows depend on, and how each is accounted for:
//! - its latest report: the rows live in its [`HostEntry`] ([`RowSlot`]); a stored report is
//!   a new entry, so its rows start empty (the entry is the generation);
//! - the fleet policy and the track indexes: rows are kept under the [`PolicyStamp`] they
//!   were rendered with, and rendered again under any other;
//! - the time: the LAST-SEEN cell (`12s`, `5m`: it changes every second for two minutes)
//!   and whether the host is stale are not kept but written when the table is, around the
//!   kept cells.
//!
//! Kept per host: its UPDATE and TRACK cells, then per row a flags byte and the cells
//! SERVICE to FAILING-PROBES, each already printable, and the widest cell of each column.
//! `--unhealthy` and the other filters read the flags and copy only the rows they keep.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use keepup_deploy::wire::{Fleet, Index};

use super::view::{age, is_stale, lines, Filter, HostEntry, Policy, Status, Summary, Tables};
use crate::report::{printable, update_cell, width, HEADER};

/// One host of a snapshot of the fleet: its name and latest report (none before the first).
pub type Snapshot = (String, Option<Arc<HostEntry>>);

/// Row flag: behind its track (or missing).
const BEHIND: u8 = 1;
/// Row flag: unhealthy (or the host's last update failed).
const UNHEALTHY: u8 = 2;
/// Row flag: quarantined.
const QUARANTINED: u8 = 4;
/// Host flag: its last update pass failed.
const FAILED_UPDATE: u8 = 8;
/// Flags are kept as the printable bytes `'0'` to `'?'`.
const FLAG_BASE: u8 = b'0';

/// Columns not kept: HOST (the registered name) and LAST-SEEN (the time).
const HOST_COL: usize = 0;
const SEEN_COL: usize = 9;

/// A host's rendered rows, kept in its summary: see the module's documentation.
#[derive(Default)]
pub struct RowSlot(Mutex<Option<HostRows>>);

impl std::fmt::Debug for RowSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowSlot")
    }
}

impl Clone for RowSlot {
    /// A copy of a summary renders its rows again.
    fn clone(&self) -> Self {
        RowSlot::default()
    }
}

/// Tells policies apart: the stamp changes whenever the fleet policy or a track index was
/// read again from the repository (a new file, a new mtime or size), or a track came or went.
#[derive(Default)]
pub struct PolicyStamp {
    last: Mutex<Option<StampedPolicy>>,
}

/// A stamp and the policy it was given to (held, so that its addresses are not reused).
type StampedPolicy = (u64, Option<Arc<Fleet>>, Vec<(String, Arc<Index>)>);

/// Stamps are unique in the process (0 is never one).
static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

impl PolicyStamp {
    /// The stamp of this fleet policy and these track indexes.
    pub fn of(&self, fleet: &Option<Arc<Fleet>>, indexes: &[(String, Arc<Index>)]) -> u64 {
        let mut indexes = indexes.to_vec();
        indexes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((stamp, f, i)) = &*last {
            let same_fleet = match (f, fleet) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            let same_indexes = i.len() == indexes.len()
                && i.iter()
                    .zip(&indexes)
                    .all(|((n, a), (m, b))| n == m && Arc::ptr_eq(a, b));
            if same_fleet && same_indexes {
                return *stamp;
            }
        }
        let stamp = NEXT_STAMP.fetch_add(1, Ordering::Relaxed);
        *last = Some((stamp, fleet.clone(), indexes));
        stamp
    }
}

/// One host's rows as rendered under a policy.
pub struct HostRows {
    /// The [`PolicyStamp`] they were rendered under.
    stamp: u64,
    /// `UPDATE \n TRACK \n`, then per row a flags byte, the cells SERVICE to FAILING-PROBES
    /// separated by tabs, and `\n`.
    text: Box<[u8]>,
    /// The widest kept cell of each column, in characters (0 for HOST and LAST-SEEN).
    widths: [u16; 11],
    /// [`BEHIND`], [`UNHEALTHY`] if a row is; [`FAILED_UPDATE`].
    flags: u8,
    /// Quarantined rows.
    quarantined: u32,
}

impl HostRows {
    /// Render the rows of host `name` from its summary under `policy`.
    fn new<'a>(
        name: &str,
        entry: Option<&'a HostEntry>,
        policy: &Policy<'a>,
        tables: &mut Tables<'a>,
    ) -> HostRows {
        let l = lines(name, entry, policy, tables);
        let mut text = Vec::with_capacity(64 * l.services.len().max(1) + 32);
        let mut widths = [0u16; 11];
        let mut cell = |text: &mut Vec<u8>, col: usize, c: &str| {
            let c = printable(Cow::Borrowed(c));
            widths[col] = widths[col].max(width(&c).min(u16::MAX as usize) as u16);
            text.extend_from_slice(c.as_bytes());
        };
        let update: Cow<'_, str> = match entry.and_then(|e| e.update.as_deref()) {
            None => "-".into(),
            Some(u) if u.ok => "ok".into(),
            Some(u) => update_cell(false, u.failure.as_ref(), u.error.as_deref()).into(),
        };
        cell(&mut text, 10, &update);
        text.push(b'\n');
        cell(&mut text, 1, l.track.unwrap_or("-"));
        text.push(b'\n');
        let mut flags = if l.update_failed { FAILED_UPDATE } else { 0 };
        let mut quarantined = 0;
        if l.services.is_empty() {
            text.push(FLAG_BASE + if l.update_failed { UNHEALTHY } else { 0 });
            for col in 2..9 {
                if col > 2 {
                    text.push(b'\t');
                }
                cell(&mut text, col, "-");
            }
            text.push(b'\n');
        }
        let mut num = String::new();
        for x in &l.services {
            let row = (if x.behind { BEHIND } else { 0 })
                | (if x.unhealthy { UNHEALTHY } else { 0 })
                | (if x.quarantined { QUARANTINED } else { 0 });
            flags |= row & (BEHIND | UNHEALTHY);
            quarantined += u32::from(x.quarantined);
            text.push(FLAG_BASE + row);
            cell(&mut text, 2, x.name);
            text.push(b'\t');
            cell(&mut text, 3, x.installed.unwrap_or("-"));
            text.push(b'\t');
            cell(&mut text, 4, x.track_version.unwrap_or("-"));
            text.push(b'\t');
            match (x.status, x.rolled_back_to) {
                (Status::RolledBack, Some(v)) => cell(&mut text, 5, &format!("rolled back to {v}")),
                (st, _) => cell(&mut text, 5, st.as_str()),
            }
            text.push(b'\t');
            match (x.service, x.failed_start) {
                (_, Some(f)) => cell(&mut text, 6, &format!("failed to start {}", f.version)),
                (Some(s), None) => cell(&mut text, 6, s.state.as_str()),
                (None, None) => cell(&mut text, 6, "-"),
            }
            text.push(b'\t');
            num.clear();
            {
                use std::fmt::Write as _;
                let _ = write!(num, "{}", x.service.map_or(0, |s| s.restarts));
            }
            cell(&mut text, 7, &num);
            text.push(b'\t');
            let mut probes = String::new();
            for p in x.failing() {
                if !probes.is_empty() {
                    probes.push(',');
                }
                probes.push_str(&p.name);
            }
            cell(&mut text, 8, if probes.is_empty() { "-" } else { &probes });
            text.push(b'\n');
        }
        HostRows {
            stamp: policy.stamp,
            text: text.into_boxed_slice(),
            widths,
            flags,
            quarantined,
        }
    }

    /// The UPDATE cell, the TRACK cell and the rows (each a flags byte and its cells).
    fn parts(&self) -> (&[u8], &[u8], impl Iterator<Item = (u8, &[u8])>) {
        let mut it = self.text.split(|&b| b == b'\n');
        let update = it.next().unwrap_or_default();
        let track = it.next().unwrap_or_default();
        let rows = it
            .filter(|r| !r.is_empty())
            .map(|r| (r[0] - FLAG_BASE, &r[1..]));
        (update, track, rows)
    }
}

/// Calls `f` with the rows of host `name`: those kept in its summary if they were rendered
/// under this policy, else rendered now (and kept, unless the policy is untold or older than
/// the kept rows' or the host has not reported yet).
fn with_rows<'a, R>(
    name: &str,
    entry: Option<&'a HostEntry>,
    policy: &Policy<'a>,
    tables: &mut Tables<'a>,
    f: impl FnOnce(&HostRows) -> R,
) -> R {
    let Some(e) = entry.filter(|_| policy.stamp != 0) else {
        return f(&HostRows::new(name, entry, policy, tables));
    };
    let mut slot = e.rows.0.lock().unwrap_or_else(|e| e.into_inner());
    match &*slot {
        Some(r) if r.stamp == policy.stamp => f(r),
        Some(r) if r.stamp > policy.stamp => f(&HostRows::new(name, entry, policy, tables)),
        _ => f(slot.insert(HostRows::new(name, entry, policy, tables))),
    }
}

fn filter_mask(filter: &Filter) -> u8 {
    (if filter.behind { BEHIND } else { 0 })
        | (if filter.unhealthy { UNHEALTHY } else { 0 })
        | (if filter.quarantined { QUARANTINED } else { 0 })
}

/// Whether `filter` keeps a row with `flags` of a host that is `stale` or not.
fn keeps(filter: &Filter, mask: u8, stale: bool, flags: u8) -> bool {
    filter.is_empty() || (filter.stale && stale) || flags & mask != 0
}

/// What the head of the table form says of some hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Counts over the hosts.
    pub summary: Summary,
    /// Rows `filter` keeps.
    pub rows: usize,
    /// Rows in all.
    pub all_rows: usize,
    /// Widths of the columns over the kept rows (the header's not included).
    pub widths: [usize; 11],
}

impl Counts {
    /// Add the counts of other hosts.
    pub fn add(&mut self, o: &Counts) {
        self.summary.add(&o.summary);
        self.rows += o.rows;
        self.all_rows += o.all_rows;
        for (a, b) in self.widths.iter_mut().zip(o.widths) {
            *a = (*a).max(b);
        }
    }
}

/// The counts of `hosts` at `now` and the rows `filter` keeps, from the kept rows (rendering
/// those that are not).
pub fn count<'a>(
    hosts: &'a [Snapshot],
    policy: &Policy<'a>,
    now: u64,
    stale_after: u64,
    filter: &Filter,
) -> Counts {
    let mut tables = Tables::default();
    let mask = filter_mask(filter);
    let mut c = Counts {
        summary: Summary {
            hosts: hosts.len(),
            ..Summary::default()
        },
        ..Counts::default()
    };
    let mut seen = String::new();
    for (name, entry) in hosts {
        let entry = entry.as_deref();
        let last_seen = entry.map(|e| e.received_at);
        let stale = is_stale(last_seen, now, stale_after);
        let s = &mut c.summary;
        if stale {
            s.stale += 1;
        } else {
            s.reporting += 1;
        }
        with_rows(name, entry, policy, &mut tables, |r| {
            s.behind += usize::from(r.flags & BEHIND != 0);
            s.unhealthy += usize::from(r.flags & (UNHEALTHY | FAILED_UPDATE) != 0);
            s.failed_updates += usize::from(r.flags & FAILED_UPDATE != 0);
            s.quarantined += r.quarantined as usize;
            let (_, _, rows) = r.parts();
            let (mut all, mut kept) = (0, 0);
            let mut every = true;
            for (flags, cells) in rows {
                all += 1;
                if !keeps(filter, mask, stale, flags) {
                    every = false;
                    continue;
                }
                kept += 1;
                if !filter.is_empty() {
                    // Only some rows: the widths of those.
                    for (i, cell) in cells.split(|&b| b == b'\t').enumerate() {
                        let w = &mut c.widths[2 + i];
                        *w = (*w).max(width(&String::from_utf8_lossy(cell)));
                    }
                }
            }
            c.all_rows += all;
            c.rows += kept;
            if kept > 0 {
                seen.clear();
                seen.push_str(&age(now, last_seen));
                let cols = [
                    (HOST_COL, width(&printable(Cow::Borrowed(name)))),
                    (SEEN_COL, seen.len()),
                ];
                for (col, w) in cols {
                    c.widths[col] = c.widths[col].max(w);
                }
                let whole = if every { 0..11 } else { 0..2 };
                for col in whole.chain([10]) {
                    if col != HOST_COL && col != SEEN_COL {
                        c.widths[col] = c.widths[col].max(usize::from(r.widths[col]));
                    }
                }
            }
        });
    }
    c
}

/// Append the rows of `hosts` that `filter` keeps, at `now`, to `out`: cells separated by
/// tabs, one row a line (what [`crate::report::table_rows`] writes from a view).
pub fn write<'a>(
    hosts: &'a [Snapshot],
    policy: &Policy<'a>,
    now: u64,
    stale_after: u64,
    filter: &Filter,
    out: &mut Vec<u8>,
) {
    let mut tables = Tables::default();
    let mask = filter_mask(filter);
    let mut seen = String::new();
    for (name, entry) in hosts {
        let entry = entry.as_deref();
        let last_seen = entry.map(|e| e.received_at);
        let stale = is_stale(last_seen, now, stale_after);
        seen.clear();
        with_rows(name, entry, policy, &mut tables, |r| {
            let (update, track, rows) = r.parts();
            for (flags, cells) in rows {
                if !keeps(filter, mask, stale, flags) {
                    continue;
                }
                if seen.is_empty() {
                    seen.push_str(&age(now, last_seen));
                }
                out.extend_from_slice(printable(Cow::Borrowed(name)).as_bytes());
                out.push(b'\t');
                out.extend_from_slice(track);
                out.push(b'\t');
                out.extend_from_slice(cells);
                out.push(b'\t');
                out.extend_from_slice(seen.as_bytes());
                out.push(b'\t');
                out.extend_from_slice(update);
                out.push(b'\n');
            }
        });
    }
}

/// The rows of `hosts` that `filter` keeps at `now`: how many in all, and the hosts that
/// have some, each with how many, until `most` rows are listed.
pub fn kept<'a>(
    hosts: &'a [Snapshot],
    policy: &Policy<'a>,
    now: u64,
    stale_after: u64,
    filter: &Filter,
    most: usize,
) -> (usize, Vec<(Snapshot, usize)>) {
    let mut tables = Tables::default();
    let mask = filter_mask(filter);
    let (mut matched, mut listed, mut out) = (0, 0, Vec::new());
    for (name, entry) in hosts {
        let e = entry.as_deref();
        let stale = is_stale(e.map(|e| e.received_at), now, stale_after);
        let n = with_rows(name, e, policy, &mut tables, |r| {
            let (_, _, rows) = r.parts();
            rows.filter(|(flags, _)| keeps(filter, mask, stale, *flags))
                .count()
        });
        matched += n;
        if n > 0 && listed < most {
            listed += n;
            out.push(((name.clone(), entry.clone()), n));
        }
    }
    (matched, out)
}

/// The widths the table's head announces: the header's, widened to `counts`.
pub fn head_widths(counts: &Counts) -> Vec<usize> {
    HEADER
        .iter()
        .zip(counts.widths)
        .map(|(h, w)| h.len().max(w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::table_rows;
    use crate::state::view;
    use keepup_deploy::wire::{
        Format, PoolEntry, ProbeReport, Report, ServiceReport, StartReport, UpdateReport,
    };

    fn pool(name: &str, version: &str, rollback_of: Option<&str>) -> PoolEntry {
        PoolEntry {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            format: Format::Deb,
            path: format!("pool/{name}_{version}.deb"),
            size: 1,
            sha256: "00".into(),
            rollback_of: rollback_of.map(String::from),
        }
    }

    fn index() -> Index {
        Index {
            track: "stable".into(),
            serial: 4,
            generated: 0,
            expires: None,
            packages: vec![
                pool("foo", "1.2-1", None),
                pool("bar", "2.1-1", Some("2.0-1")),
                pool("baz", "1.0-1", None),
            ],
            rollouts: vec![],
            rollout_key: None,
        }
    }

    fn fleet() -> Fleet {
        let mut fleet = Fleet::default();
        fleet.assign("web*", "stable", vec![]).unwrap();
        fleet.assign("db*", "stable", vec!["bar".into()]).unwrap();
        fleet.quarantine("baz", "web3").unwrap();
        fleet
    }

    fn report(name: &str, installed: &[(&str, &str)], state: &str) -> Report {
        let mut r = Report {
            host: name.into(),
            format: Some(Format::Deb),
            ..Report::default()
        };
        for (n, v) in installed {
            r.installed.insert(n.to_string(), v.to_string());
            r.services.push(ServiceReport {
                name: n.to_string(),
                version: v.to_string(),
                state: state.into(),
                ..ServiceReport::default()
            });
        }
        r
    }

    fn snap(r: &Report, at: u64) -> Snapshot {
        (r.host.clone(), Some(Arc::new(HostEntry::of(r, at))))
    }

    fn hosts() -> Vec<Snapshot> {
        let mut web3 = report("web3", &[("foo", "1.2-1"), ("baz", "1.0-1")], "running");
        web3.services[0].probes.push(ProbeReport {
            name: "pört".into(),
            ok: Some(false),
            reason: Some("refused".into()),
            ..ProbeReport::default()
        });
        web3.update = Some(UpdateReport {
            at: 999,
            ok: false,
            error: Some(format!("repository unreachable: {}", "x".repeat(80))),
            ..UpdateReport::default()
        });
        let mut web4 = report("web4", &[("foo", "1.2-1")], "running");
        web4.services[0].start = Some(StartReport {
            version: "1.2-1".into(),
            started: false,
            ..StartReport::default()
        });
        vec![
            snap(&report("db1", &[("bar", "2.1-1")], "running"), 1000),
            snap(&report("db2", &[], "running"), 10),
            snap(&report("web1", &[("foo", "1.1-1")], "backoff"), 1000),
            snap(&web3, 1000),
            snap(&web4, 990),
            ("web9".to_string(), None),
        ]
    }

    /// The table as `keepup report` gets it: rows, widths, row count and summary.
    type Table = (String, Vec<usize>, usize, Summary);

    /// Through a built view, as before the rows were kept.
    fn via_view(hosts: &[Snapshot], policy: &Policy<'_>, now: u64, f: &Filter) -> Table {
        let v = view::build(hosts, policy, now, 600);
        let mut out = Vec::new();
        let mut widths = HEADER.map(str::len);
        let n = table_rows(&v.hosts, now, f, &mut out, &mut widths);
        (
            String::from_utf8(out).unwrap(),
            widths.to_vec(),
            n,
            v.summary,
        )
    }

    /// From the kept rows.
    fn via_rows(hosts: &[Snapshot], policy: &Policy<'_>, now: u64, f: &Filter) -> Table {
        let c = count(hosts, policy, now, 600, f);
        let mut out = Vec::new();
        write(hosts, policy, now, 600, f, &mut out);
        (
            String::from_utf8(out).unwrap(),
            head_widths(&c),
            c.rows,
            c.summary,
        )
    }

    #[test]
    fn rows_from_summaries_are_those_of_the_view() {
        let (fleet, index) = (fleet(), index());
        let mut policy = Policy {
            fleet: Some(&fleet),
            stamp: 7,
            ..Policy::default()
        };
        policy.indexes.insert("stable", &index);
        let hosts = hosts();
        let only = |f: fn(&mut Filter)| {
            let mut x = Filter::default();
            f(&mut x);
            x
        };
        for filter in [
            Filter::default(),
            only(|f| f.behind = true),
            only(|f| f.unhealthy = true),
            only(|f| f.stale = true),
            only(|f| f.quarantined = true),
            only(|f| {
                f.behind = true;
                f.stale = true
            }),
        ] {
            // Twice: rendered, then kept.
            for _ in 0..2 {
                assert_eq!(
                    via_rows(&hosts, &policy, 1100, &filter),
                    via_view(&hosts, &policy, 1100, &filter),
                    "{filter:?}"
                );
            }
        }
        let all = via_rows(&hosts, &policy, 1100, &Filter::default()).0;
        assert!(all.contains("web3\tstable\tfoo\t1.2-1\t1.2-1\tcurrent\trunning\t0\tpört\t100s\tfailed: repository unreachable"), "{all}");
        assert!(
            all.contains("web9\tstable\tbar\t-\t2.1-1\tmissing\t-\t0\t-\tnever\t-\n"),
            "{all}"
        );
    }

    /// The address of the text kept for the first host: the same address, not rendered again.
    fn kept(hosts: &[Snapshot]) -> (usize, u64) {
        let slot = hosts[0].1.as_ref().unwrap().rows.0.lock().unwrap();
        let r = slot.as_ref().expect("rows kept");
        (r.text.as_ptr() as usize, r.stamp)
    }

    #[test]
    fn kept_rows_change_with_the_report_the_policy_and_the_age() {
        let stamps = PolicyStamp::default();
        let fleet1 = Arc::new(fleet());
        let index = Arc::new(index());
        let indexes = vec![("stable".to_string(), index.clone())];
        let s1 = stamps.of(&Some(fleet1.clone()), &indexes);
        assert_eq!(s1, stamps.of(&Some(fleet1.clone()), &indexes), "same files");
        let mut p1 = Policy {
            fleet: Some(&fleet1),
            stamp: s1,
            ..Policy::default()
        };
        p1.indexes.insert("stable", &index);
        let table = |hosts: &[Snapshot], p: &Policy<'_>, now: u64| {
            let mut out = Vec::new();
            write(hosts, p, now, 600, &Filter::default(), &mut out);
            String::from_utf8(out).unwrap()
        };
        let hosts = vec![snap(&report("web1", &[("foo", "1.1-1")], "running"), 1000)];
        let at_10s = table(&hosts, &p1, 1010);
        assert_eq!(
            at_10s.lines().find(|l| l.contains("\tfoo\t")),
            Some("web1\tstable\tfoo\t1.1-1\t1.2-1\tbehind\trunning\t0\t-\t10s\t-")
        );
        let first = kept(&hosts);
        // The age: the LAST-SEEN cell moves with the time; the kept rows stay.
        let at_3m = table(&hosts, &p1, 1200);
        assert!(
            at_3m.contains("\t-\t3m\t-\n") && !at_3m.contains("10s"),
            "{at_3m}"
        );
        let at_4m = table(&hosts, &p1, 1260);
        assert!(at_4m.contains("\t4m\t"), "{at_4m}");
        assert_eq!(kept(&hosts), first, "not rendered again for the time");
        // Stale past stale_after: the same kept rows, filtered by the time.
        let stale = only_stale(&hosts, &p1, 1601);
        assert_eq!(stale.lines().count(), 3, "{stale}");
        assert!(only_stale(&hosts, &p1, 1600).is_empty());

        // A stored report is a new summary: rendered from it.
        let hosts2 = vec![snap(&report("web1", &[("foo", "1.2-1")], "running"), 1300)];
        let after = table(&hosts2, &p1, 1310);
        assert!(after.contains("\tfoo\t1.2-1\t1.2-1\tcurrent\t"), "{after}");
        assert!(at_10s.contains("\tbehind\t"));

        // The policy: a quarantine published, the fleet policy read again.
        let mut f2 = fleet();
        f2.quarantine("foo", "web1").unwrap();
        let fleet2 = Arc::new(f2);
        let s2 = stamps.of(&Some(fleet2.clone()), &indexes);
        assert!(s2 > s1);
        let mut p2 = Policy {
            fleet: Some(&fleet2),
            stamp: s2,
            ..Policy::default()
        };
        p2.indexes.insert("stable", &index);
        let quarantined = table(&hosts2, &p2, 1310);
        assert!(
            quarantined.contains("\tfoo\t1.2-1\t1.2-1\tquarantined\t"),
            "{quarantined}"
        );
        assert_eq!(kept(&hosts2).1, s2);
        // Rows kept under a newer policy are not replaced by an older one's.
        assert_eq!(table(&hosts2, &p1, 1310), after);
        assert_eq!(kept(&hosts2).1, s2);
        // A track index read again, or gone: another stamp.
        let index2 = Arc::new(super::tests::index());
        let s3 = stamps.of(&Some(fleet2.clone()), &[("stable".into(), index2)]);
        assert!(s3 > s2);
        assert!(stamps.of(&Some(fleet2), &[]) > s3);
    }

    fn only_stale(hosts: &[Snapshot], p: &Policy<'_>, now: u64) -> String {
        let mut out = Vec::new();
        let f = Filter {
            stale: true,
            ..Filter::default()
        };
        write(hosts, p, now, 600, &f, &mut out);
        String::from_utf8(out).unwrap()
    }
}
