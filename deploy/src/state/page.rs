//! The fleet page at `/`: the same view as `keepup report`, server-rendered HTML that reloads
//! itself every 10 s, needs no JavaScript and reads on a phone (rows become cards on narrow
//! screens). Every value from reports is HTML-escaped. Large fleets show the problem rows
//! only, and at most [`MAX_ROWS`] of them.

use std::fmt::Write as _;

use keepup_deploy::wire::{Event, ServiceState};

use super::gate::{RolloutStatus, WaveStatus, WAVE_COLUMNS};
use super::view::{age, Filter, FleetView, HostView, ServiceView};

/// Rows rendered at most.
pub const MAX_ROWS: usize = 1000;
/// Fleets with more rows than this open on the problem rows.
const ALL_ROWS_UP_TO: usize = 500;
/// Events listed under the table.
pub const EVENTS_SHOWN: usize = 30;

/// What the page's query selects.
#[derive(Debug, Clone, Default)]
pub struct PageQuery {
    /// `?filter=`: one of the fixed set, or none given.
    pub filter: Option<PageFilter>,
    /// `?filter=` named no filter of the set (the page says so and shows the default).
    pub unknown_filter: bool,
    /// Only this host.
    pub host: Option<String>,
}

/// The rows the page can show: the fixed set `?filter=` chooses from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFilter {
    /// Every row.
    All,
    /// Behind, unhealthy, stale or quarantined rows.
    Problems,
    /// Services behind their track.
    Behind,
    /// Unhealthy services and failed updates.
    Unhealthy,
    /// Hosts not heard from.
    Stale,
    /// Quarantined services.
    Quarantined,
}

impl PageFilter {
    /// Every filter, in the order the page lists them.
    pub const ALL: [PageFilter; 6] = [
        PageFilter::All,
        PageFilter::Problems,
        PageFilter::Behind,
        PageFilter::Unhealthy,
        PageFilter::Stale,
        PageFilter::Quarantined,
    ];

    /// The filter called `name` in a query, if there is one.
    pub fn parse(name: &str) -> Option<PageFilter> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Its name in queries and on the page.
    pub fn name(self) -> &'static str {
        match self {
            PageFilter::All => "all",
            PageFilter::Problems => "problems",
            PageFilter::Behind => "behind",
            PageFilter::Unhealthy => "unhealthy",
            PageFilter::Stale => "stale",
            PageFilter::Quarantined => "quarantined",
        }
    }

    /// The rows it keeps, as a table filter.
    pub fn rows(self) -> Filter {
        let only = |f: fn(&mut Filter)| {
            let mut x = Filter::default();
            f(&mut x);
            x
        };
        match self {
            PageFilter::All => Filter::default(),
            PageFilter::Problems => Filter {
                behind: true,
                unhealthy: true,
                stale: true,
                quarantined: true,
            },
            PageFilter::Behind => only(|f| f.behind = true),
            PageFilter::Unhealthy => only(|f| f.unhealthy = true),
            PageFilter::Stale => only(|f| f.stale = true),
            PageFilter::Quarantined => only(|f| f.quarantined = true),
        }
    }
}

/// Escape text for HTML content and attribute values (quoted with `"` or `'`): the one
/// function every value on the page goes through.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0 1rem 2rem;color:#222;background:#fafafa}
h1{font-size:1.3rem;margin:.8rem 0 .4rem}
.counts{display:flex;flex-wrap:wrap;gap:.4rem;margin:.4rem 0}
.counts a{display:block;padding:.3rem .6rem;border-radius:.4rem;background:#e8eef5;color:#123;text-decoration:none}
.counts a.on{outline:2px solid #357}
.counts b{font-size:1.1rem;margin-right:.25rem}
.counts .bad b{color:#b00}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.25rem .5rem;border-bottom:1px solid #ddd;vertical-align:top}
th{background:#eee;position:sticky;top:0}
tr.bad td{background:#fde8e8}
tr.warn td{background:#fff6d6}
td.err{color:#b00}
td[data-l=state]{white-space:pre-line}
.note{color:#555;font-size:.85rem}
ul.events{padding-left:1.2rem;font-size:.9rem}
@media (max-width:700px){
 table,thead,tbody,tr,td{display:block}
 thead{display:none}
 tr{margin:.5rem 0;border:1px solid #ccc;border-radius:.4rem;background:#fff}
 td{border:none;padding:.1rem .5rem}
 td::before{content:attr(data-l) \": \";font-weight:600;color:#555}
}
";

const COLUMNS: [&str; 11] = [
    "host",
    "track",
    "service",
    "installed",
    "track version",
    "status",
    "state",
    "restarts",
    "failing probes",
    "last seen",
    "update",
];

/// Rows of the whole fleet, for a view that holds only the hosts the page shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowCounts {
    /// Rows of every host.
    pub total: usize,
    /// Rows the chosen filter (and host) keep.
    pub matched: usize,
}

/// The filter the page applies: the query's, else every row of a small fleet and the
/// problem rows of a large one (`total_rows` rows in all).
pub fn choose(q: &PageQuery, total_rows: usize) -> PageFilter {
    q.filter.unwrap_or(if total_rows > ALL_ROWS_UP_TO {
        PageFilter::Problems
    } else {
        PageFilter::All
    })
}

/// Render the page for `view` and the query; `events` are the latest events (of the
/// query's host, or of the fleet), newest first. With `counts`, `view` holds only the hosts
/// to show and `fleet_rows` says how many rows the fleet has.
pub fn render(
    view: &FleetView,
    q: &PageQuery,
    rollouts: &[RolloutStatus],
    events: &[(String, Event)],
    fleet_rows: Option<RowCounts>,
) -> String {
    let total_rows: usize = fleet_rows.map_or_else(
        || view.hosts.iter().map(|h| h.services.len().max(1)).sum(),
        |c| c.total,
    );
    let chosen = choose(q, total_rows);
    let filter_name = chosen.name();
    let filter = chosen.rows();
    let host_q = q
        .host
        .as_ref()
        .map(|h| format!("&amp;host={}", escape(&url_part(h))))
        .unwrap_or_default();
    let s = &view.summary;
    let mut o = String::with_capacity(64 * 1024);
    o.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    o.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    o.push_str(
        "<meta http-equiv=\"refresh\" content=\"10\">\n<title>keepup fleet</title>\n<style>",
    );
    o.push_str(STYLE);
    o.push_str("</style></head><body>\n<h1>keepup fleet");
    if let Some(h) = &q.host {
        let _ = write!(o, ": {}", escape(h));
    }
    o.push_str("</h1>\n<div class=\"counts\">");
    let counts: [(&str, usize, PageFilter, bool); 7] = [
        ("hosts", s.hosts, PageFilter::All, false),
        ("reporting", s.reporting, PageFilter::All, false),
        ("stale", s.stale, PageFilter::Stale, true),
        ("behind", s.behind, PageFilter::Behind, true),
        ("unhealthy", s.unhealthy, PageFilter::Unhealthy, true),
        ("quarantined", s.quarantined, PageFilter::Quarantined, false),
        (
            "failed updates",
            s.failed_updates,
            PageFilter::Unhealthy,
            true,
        ),
    ];
    for (label, n, f, alarm) in counts {
        let f = f.name();
        let class = match (f == filter_name && label != "reporting", alarm && n > 0) {
            (true, true) => " class=\"on bad\"",
            (true, false) => " class=\"on\"",
            (false, true) => " class=\"bad\"",
            (false, false) => "",
        };
        let _ = write!(
            o,
            "<a href=\"/?filter={f}{host_q}\"{class}><b>{n}</b>{label}</a>"
        );
    }
    let _ = writeln!(
        o,
        "<a href=\"/?filter=problems{host_q}\"{}>problems</a></div>",
        if filter_name == "problems" {
            " class=\"on\""
        } else {
            ""
        }
    );

    if q.unknown_filter {
        let names: Vec<&str> = PageFilter::ALL.iter().map(|f| f.name()).collect();
        let _ = writeln!(
            o,
            "<p class=\"note err\">unknown filter; showing {}. Filters: {}.</p>",
            escape(filter_name),
            escape(&names.join(", "))
        );
    }
    o.push_str("<table><thead><tr>");
    for c in COLUMNS {
        let _ = write!(o, "<th>{c}</th>");
    }
    o.push_str("</tr></thead><tbody>\n");
    let mut shown = 0;
    let mut matched = 0;
    for h in &view.hosts {
        if q.host.as_ref().is_some_and(|x| *x != h.host) {
            continue;
        }
        let rows: Vec<Option<&ServiceView>> = if h.services.is_empty() {
            vec![None]
        } else {
            h.services.iter().map(Some).collect()
        };
        for svc in rows {
            if !filter.keeps(h, svc) {
                continue;
            }
            matched += 1;
            if shown < MAX_ROWS {
                shown += 1;
                row(&mut o, view.generated_at, h, svc);
            }
        }
    }
    o.push_str("</tbody></table>\n");
    if let Some(c) = fleet_rows {
        matched = c.matched;
    }
    let _ = writeln!(
        o,
        "<p class=\"note\">{shown} of {matched} matching rows ({}); {total_rows} rows in all. \
         Full list: <code>keepup report</code> or <a href=\"/api/v1/fleet\">/api/v1/fleet</a>. \
         Generated at {} (unix), stale after {} s.</p>",
        escape(filter_name),
        view.generated_at,
        view.stale_after
    );

    if !rollouts.is_empty() {
        rollouts_section(&mut o, rollouts);
    }

    // Recent events: the host's, or the fleet's newest.
    let events = &events[..events.len().min(EVENTS_SHOWN)];
    o.push_str("<h2>Recent events</h2>\n<ul class=\"events\">\n");
    for (host, e) in events {
        let _ = writeln!(
            o,
            "<li>{} ago <a href=\"/?host={}\">{}</a> {}{}: {}</li>",
            age(view.generated_at, Some(e.at)),
            escape(&url_part(host)),
            escape(host),
            e.service
                .as_deref()
                .map(|s| format!("{} ", escape(s)))
                .unwrap_or_default(),
            escape(e.kind.as_str()),
            escape(&e.message)
        );
    }
    if events.is_empty() {
        o.push_str("<li>none</li>\n");
    }
    o.push_str("</ul>\n</body></html>\n");
    o
}

/// Percent-encode what is not safe in a query value.
fn url_part(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn row(o: &mut String, now: u64, h: &HostView, svc: Option<&ServiceView>) {
    let bad = svc.is_some_and(|s| s.unhealthy) || h.update.as_ref().is_some_and(|u| !u.ok);
    let warn = h.stale || svc.is_some_and(|s| s.behind || s.quarantined);
    let class = if bad {
        " class=\"bad\""
    } else if warn {
        " class=\"warn\""
    } else {
        ""
    };
    let _ = write!(o, "<tr{class}>");
    let cell = |o: &mut String, label: &str, v: &str, err: bool| {
        let _ = write!(
            o,
            "<td data-l=\"{label}\"{}>{}</td>",
            if err { " class=\"err\"" } else { "" },
            escape(v)
        );
    };
    let _ = write!(
        o,
        "<td data-l=\"host\"><a href=\"/?host={}\">{}</a></td>",
        escape(&url_part(&h.host)),
        escape(&h.host)
    );
    cell(o, "track", h.track.as_deref().unwrap_or("-"), false);
    match svc {
        Some(s) => {
            cell(o, "service", &s.name, false);
            cell(o, "installed", s.installed.as_deref().unwrap_or("-"), false);
            cell(
                o,
                "track version",
                s.track_version.as_deref().unwrap_or("-"),
                false,
            );
            cell(o, "status", &s.status_text(), s.behind);
            let state = match &s.failed_start {
                Some(f) => format!(
                    "{} (failed to start {}: {}){}{}",
                    s.state.as_ref().map_or("-", ServiceState::as_str),
                    f.version,
                    f.detail,
                    if f.log_tail.is_empty() { "" } else { "\n" },
                    f.log_tail.join("\n")
                ),
                None => s
                    .state
                    .as_ref()
                    .map_or("-", ServiceState::as_str)
                    .to_string(),
            };
            cell(o, "state", &state, s.unhealthy);
            cell(o, "restarts", &s.restarts.to_string(), false);
            let probes: Vec<String> = s
                .failing_probes
                .iter()
                .enumerate()
                .map(
                    |(i, name)| match s.probe_reasons.get(i).filter(|r| !r.is_empty()) {
                        Some(r) => format!("{name} ({r})"),
                        None => name.clone(),
                    },
                )
                .collect();
            cell(o, "failing probes", &probes.join(", "), true);
        }
        None => {
            for l in &COLUMNS[2..9] {
                cell(o, l, "-", false);
            }
        }
    }
    cell(o, "last seen", &age(now, h.last_seen), h.stale);
    let update = match &h.update {
        None => "-".to_string(),
        Some(u) if u.ok => format!("ok {} ago", age(now, Some(u.at))),
        Some(u) => format!(
            "failed {} ago: {}",
            age(now, Some(u.at)),
            u.error.as_deref().unwrap_or("")
        ),
    };
    cell(
        o,
        "update",
        &update,
        h.update.as_ref().is_some_and(|u| !u.ok),
    );
    o.push_str("</tr>\n");
}

/// The colours of the version spread, in bar order: (what, fill).
const SPREAD: [(&str, &str); 5] = [
    ("healthy on the new version", "#2e7d32"),
    ("on the new version, not settled", "#f9a825"),
    ("failed on the new version", "#c62828"),
    ("on the previous version", "#90a4ae"),
    ("not reporting", "#e0e0e0"),
];

/// The hosts of a rollout per [`SPREAD`] category.
pub fn spread(r: &RolloutStatus) -> [usize; 5] {
    let sum = |f: fn(&WaveStatus) -> usize| r.waves.iter().map(f).sum::<usize>();
    let (hosts, on_new, healthy, failed, silent) = (
        sum(|w| w.hosts),
        sum(|w| w.on_new),
        sum(|w| w.healthy),
        sum(|w| w.failed),
        sum(|w| w.not_reporting),
    );
    let unsettled = on_new.saturating_sub(healthy + failed);
    let previous = hosts.saturating_sub(on_new + silent);
    [healthy, unsettled, failed, previous, silent]
}

/// A stacked bar of the rollout's hosts by version and health, as inline SVG (no script): one
/// rectangle per category, each with a `<title>` a browser shows on hover.
pub fn spread_svg(r: &RolloutStatus) -> String {
    const W: f64 = 480.0;
    let counts = spread(r);
    let total: usize = counts.iter().sum();
    let mut svg = format!(
        "<svg class=\"spread\" role=\"img\" width=\"{W}\" height=\"22\" viewBox=\"0 0 {W} 22\" \
         xmlns=\"http://www.w3.org/2000/svg\" data-rollout=\"{}\"><title>{} {}: {}</title>",
        escape(&r.id),
        escape(&r.name),
        escape(&r.to),
        SPREAD
            .iter()
            .zip(counts)
            .map(|((what, _), n)| format!("{n} {what}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut x = 0.0;
    for ((what, fill), n) in SPREAD.iter().zip(counts) {
        if n == 0 || total == 0 {
            continue;
        }
        let w = W * n as f64 / total as f64;
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"0\" width=\"{w:.1}\" height=\"22\" fill=\"{fill}\" \
             data-hosts=\"{n}\"><title>{n} {what}</title></rect>"
        );
        x += w;
    }
    svg.push_str("</svg>");
    svg
}

/// The rollouts: per rollout, its state, the version spread as a bar, and one row per wave.
fn rollouts_section(o: &mut String, rollouts: &[RolloutStatus]) {
    o.push_str("<h2>Rollouts</h2>\n<p class=\"note\">");
    for (what, fill) in SPREAD {
        let _ = write!(
            o,
            "<span style=\"display:inline-block;width:.8em;height:.8em;background:{fill}\"></span> {what} &nbsp; "
        );
    }
    o.push_str("</p>\n");
    for r in rollouts {
        let _ = writeln!(
            o,
            "<h3>{} {} &rarr; {} in {}: {}{}</h3>\n{}",
            escape(&r.name),
            escape(r.from.as_deref().unwrap_or("(none)")),
            escape(&r.to),
            escape(&r.track),
            escape(&r.phase),
            r.soak_left
                .map(|s| format!(", soak {s} s left"))
                .unwrap_or_default(),
            spread_svg(r)
        );
        o.push_str("<table><tr>");
        for c in WAVE_COLUMNS {
            let _ = write!(o, "<th>{c}</th>");
        }
        o.push_str("</tr>\n");
        for w in &r.waves {
            o.push_str("<tr>");
            for c in w.cells() {
                let _ = write!(o, "<td>{}</td>", escape(&c));
            }
            o.push_str("</tr>\n");
        }
        o.push_str("</table>\n");
        let failed = if r.failed.is_empty() {
            String::new()
        } else {
            format!(
                " Failed: {}.",
                r.failed
                    .iter()
                    .map(|h| escape(h))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let _ = writeln!(o, "<p class=\"note\">{}.{failed}</p>", escape(&r.decision));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::view::{Status, Summary};

    #[test]
    fn values_are_escaped_and_filters_apply() {
        let v = FleetView {
            generated_at: 100,
            stale_after: 600,
            fleet_serial: None,
            summary: Summary::default(),
            hosts: vec![
                HostView {
                    host: "web<1>".into(),
                    last_seen: Some(90),
                    services: vec![ServiceView {
                        name: "foo\"&".into(),
                        installed: Some("1.0-1".into()),
                        track_version: Some("1.1-1".into()),
                        status: Status::Behind,
                        rolled_back_to: None,
                        state: Some("running".into()),
                        restarts: 0,
                        failing_probes: vec!["port".into()],
                        probe_reasons: vec!["<img src=x onerror=alert(2)>".into()],
                        quarantined: false,
                        failed_start: Some(keepup_deploy::wire::StartReport {
                            version: "1.0-1".into(),
                            detail: "exited 1".into(),
                            log_tail: vec!["</td><script>alert(3)</script>".into()],
                            ..Default::default()
                        }),
                        behind: true,
                        unhealthy: false,
                    }],
                    ..HostView::default()
                },
                HostView {
                    host: "db1".into(),
                    last_seen: Some(95),
                    ..HostView::default()
                },
            ],
        };
        let all = render(&v, &PageQuery::default(), &[], &[], None);
        assert!(all.contains("web&lt;1&gt;"));
        assert!(all.contains("foo&quot;&amp;"));
        assert!(!all.contains("web<1>"));
        assert!(all.contains("http-equiv=\"refresh\" content=\"10\""));
        assert!(all.contains(">db1<"));
        let behind = render(
            &v,
            &PageQuery {
                filter: PageFilter::parse("behind"),
                ..PageQuery::default()
            },
            &[],
            &[],
            None,
        );
        assert!(!behind.contains(">db1<"));
        assert!(behind.contains("1 of 1 matching rows"));
        assert!(all.contains("port (&lt;img src=x onerror=alert(2)&gt;)"));
        assert!(all.contains("&lt;/td&gt;&lt;script&gt;alert(3)&lt;/script&gt;"));
        assert!(!all.contains("<script") && !all.contains("<img"));
        // An unknown filter is named nowhere: the page says so and shows the default.
        let unknown = render(
            &v,
            &PageQuery {
                unknown_filter: true,
                ..PageQuery::default()
            },
            &[],
            &[],
            None,
        );
        assert!(unknown.contains("unknown filter; showing all."));
        assert!(unknown.contains("2 of 2 matching rows (all)"));
    }

    #[test]
    fn rollouts_show_a_spread_bar_with_escaped_names() {
        let r = RolloutStatus {
            id: "stable/foo/2.0-1".into(),
            track: "stable".into(),
            name: "foo".into(),
            from: Some("1.0-1".into()),
            to: "2.0-1<script>".into(),
            phase: "rolling".into(),
            open: 1,
            waves: vec![
                WaveStatus {
                    wave: "1: canary-*".into(),
                    open: true,
                    hosts: 2,
                    on_new: 2,
                    healthy: 1,
                    failed: 1,
                    ..WaveStatus::default()
                },
                WaveStatus {
                    wave: "2: 100%".into(),
                    hosts: 5,
                    waiting: 4,
                    not_reporting: 1,
                    ..WaveStatus::default()
                },
            ],
            soak_left: Some(12),
            failed: vec!["canary-2".into()],
            decision: "waiting: canary-2 failed".into(),
        };
        assert_eq!(spread(&r), [1, 0, 1, 4, 1]);
        let svg = spread_svg(&r);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"), "{svg}");
        assert_eq!(
            svg.matches("<rect").count(),
            4,
            "one rectangle per non-empty category"
        );
        assert!(svg.contains("data-hosts=\"4\"><title>4 on the previous version</title>"));
        let page = render(
            &FleetView::default(),
            &PageQuery::default(),
            &[r],
            &[],
            None,
        );
        assert!(page.contains("<h2>Rollouts</h2>") && page.contains("soak 12 s left"));
        assert!(!page.contains("<script>") && page.contains("2.0-1&lt;script&gt;"));
        assert!(page.contains("Failed: canary-2."));
    }
}
