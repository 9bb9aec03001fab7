//! `keepup report`: fetches the fleet view from a `keepup serve --state` server and prints
//! summary counts and a table of hosts x services (or the JSON), optionally only the rows
//! that are behind, unhealthy or stale. Every string in the table came from some host: control
//! characters (escape sequences, carriage returns, newlines, C1 controls, bidi overrides) are
//! shown as `\u{..}` escapes, never sent to the terminal; `--json` prints the JSON as received.

use std::borrow::Cow;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use keepup_deploy::https::{self, Target, Trust};
use keepup_deploy::wire::report::FLEET_PATH;
use rustls::pki_types::ServerName;
use serde::Deserialize;

use crate::state::view::{age, Filter, FleetView, Status, Summary};

/// What `keepup report` was asked for.
pub struct ReportOptions {
    /// Server base URL (`http[s]://HOST:PORT`).
    pub server: String,
    /// The CAs trusted for an `https://` server.
    pub trust: Trust,
    /// Print the JSON instead of the table.
    pub json: bool,
    /// Which rows to keep.
    pub filter: Filter,
    /// Seconds of silence after which a host is stale.
    pub stale_after: u64,
    /// The server's read token (`keepup serve --read-token-file`), if it has one.
    pub read_token: Option<String>,
}

/// Parse `600`, `600s`, `10m`, `2h`, `1d` into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("{s:?} is not a duration (examples: 90s, 10m, 2h, 1d)"))
}

/// Seconds as [`parse_duration`] reads them back: `90s`, `10m`, `2h`, `1d`.
pub fn format_duration(secs: u64) -> String {
    match secs {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// How `keepup report` names a CA file, for messages.
const FIX: &str = "pass --ca-file with";

/// GET `path` from `to` over HTTP/1, plain or TLS (trusting `trust`), with the read token as
/// a bearer token; returns the status and body.
async fn get(
    to: &Target,
    path: &str,
    trust: &Trust,
    token: Option<&str>,
) -> Result<(StatusCode, Bytes)> {
    // The TLS settings are checked before connecting: a bad CA file is not a network problem.
    let tls = match to.tls {
        true => Some(https::client_config(trust, FIX).map_err(|e| anyhow!("TLS: {e}"))?),
        false => None,
    };
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(&to.connect),
    )
    .await
    .map_err(|_| anyhow!("timed out connecting to {}", to.connect))??;
    let mut req = Request::get(path).header(hyper::header::HOST, &to.host);
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let work = async {
        let resp = match tls {
            None => send(stream, req).await?,
            Some(config) => {
                let name = ServerName::try_from(to.server_name.clone())
                    .map_err(|_| anyhow!("{:?} is not a host name", to.server_name))?;
                let stream = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio_rustls::TlsConnector::from(config).connect(name, stream),
                )
                .await
                .map_err(|_| anyhow!("no TLS handshake within 10 s"))?
                .map_err(|e| {
                    anyhow!(
                        "TLS: {}",
                        https::explain_failure(&to.server_name, trust, FIX, &e)
                    )
                })?;
                send(stream, req).await?
            }
        };
        Ok::<_, anyhow::Error>(resp)
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .map_err(|_| anyhow!("no complete answer within 120 s"))?
}

/// Sends `req` on a new HTTP/1 connection over `io`; the status and the whole body.
async fn send<I>(io: I, req: Request<Empty<Bytes>>) -> Result<(StatusCode, Bytes)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    conn.abort();
    Ok((status, body))
}

/// Where `--server` points: `http[s]://HOST[:PORT][/PREFIX]`, or `HOST:PORT` for plain HTTP.
fn server_target(server: &str) -> Result<Target> {
    let url = match server.contains("://") {
        true => server.to_string(),
        false => format!("http://{server}"),
    };
    Target::parse(&url).map_err(|e| {
        anyhow!("--server {e} (examples: http://127.0.0.1:8080, https://fleet.example:8443)")
    })
}

/// Fetch the fleet view's JSON from the server at `server` (`http[s]://HOST[:PORT][/PREFIX]`),
/// trusting `trust` for `https://`.
pub fn fetch(
    server: &str,
    trust: &Trust,
    stale_after: u64,
    events: bool,
    read_token: Option<&str>,
) -> Result<Bytes> {
    let path = format!(
        "{FLEET_PATH}?stale_after={stale_after}{}",
        if events { "" } else { "&events=0" }
    );
    fetch_path(server, trust, &path, read_token)
}

/// GET `path` (with its query) from the fleet state server at `server`, trusting `trust` for
/// `https://`, with the read token if any; the body of a 2xx answer, else an error that says
/// what to do.
pub fn fetch_path(
    server: &str,
    trust: &Trust,
    path: &str,
    read_token: Option<&str>,
) -> Result<Bytes> {
    let to = server_target(server)?;
    let prefix = to.path.trim_end_matches('/');
    let path = format!("{prefix}{path}");
    let url = format!(
        "{}://{}{path}",
        if to.tls { "https" } else { "http" },
        to.host
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt
        .block_on(get(&to, &path, trust, read_token))
        .with_context(|| {
            format!(
            "cannot reach the keepup server at {url}: is `keepup serve --repo DIR --state FILE` \
             running there and reachable from here? (choose another server with --server URL)"
        )
        })?;
    if status == StatusCode::UNAUTHORIZED {
        bail!(
            "{url} answered 401: {}; pass the server's read token with --read-token-file FILE",
            if read_token.is_some() {
                "the read token is wrong"
            } else {
                "that server requires a read token"
            }
        );
    }
    if status == StatusCode::NOT_FOUND {
        bail!(
            "{url} answered 404: that server keeps no fleet state; start it with \
             `keepup serve --repo DIR --state FILE`"
        );
    }
    if !status.is_success() {
        bail!(
            "{url} answered {status}: {}",
            printable(
                String::from_utf8_lossy(&body[..body.len().min(300)])
                    .trim()
                    .into()
            )
        );
    }
    Ok(body)
}

/// `keepup report`.
pub fn run(o: &ReportOptions) -> Result<()> {
    let want_events = o.json;
    let body = fetch(
        &o.server,
        &o.trust,
        o.stale_after,
        want_events,
        o.read_token.as_deref(),
    )?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    if o.json && o.filter.is_empty() {
        out.write_all(&body)?;
        out.write_all(b"\n")?;
        out.flush()?;
        return Ok(());
    }
    if o.json {
        let mut view: FleetView = serde_json::from_slice(&body)
            .with_context(|| format!("{}: the answer is not a fleet view", o.server))?;
        for h in &mut view.hosts {
            let host = h.clone();
            h.services.retain(|s| o.filter.keeps(&host, Some(s)));
        }
        view.hosts
            .retain(|h| !h.services.is_empty() || o.filter.keeps(h, None));
        serde_json::to_writer(&mut out, &view)?;
        out.write_all(b"\n")?;
        out.flush()?;
        return Ok(());
    }
    let view: TableView<'_> = serde_json::from_slice(&body)
        .with_context(|| format!("{}: the answer is not a fleet view", o.server))?;
    render(&view, &o.filter, &mut out)?;
    out.flush()?;
    Ok(())
}

// What the table needs of the fleet view, borrowing its strings from the response body
// (a fleet of 100,000 hosts is a response of tens of megabytes). Field names are those of
// [`FleetView`]; the server computes the flags.

#[derive(Deserialize)]
struct TableView<'a> {
    generated_at: u64,
    summary: Summary,
    #[serde(borrow)]
    hosts: Vec<TableHost<'a>>,
}

#[derive(Deserialize)]
struct TableHost<'a> {
    #[serde(borrow)]
    host: Cow<'a, str>,
    #[serde(borrow, default)]
    track: Option<Cow<'a, str>>,
    #[serde(default)]
    last_seen: Option<u64>,
    #[serde(default)]
    stale: bool,
    #[serde(borrow, default)]
    update: Option<TableUpdate<'a>>,
    #[serde(borrow, default)]
    services: Vec<TableService<'a>>,
}

#[derive(Deserialize)]
struct TableUpdate<'a> {
    ok: bool,
    #[serde(borrow, default)]
    error: Option<Cow<'a, str>>,
    #[serde(default)]
    failure: Option<keepup_deploy::wire::UpdateFailure>,
}

#[derive(Deserialize)]
struct TableService<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    installed: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    track_version: Option<Cow<'a, str>>,
    status: Status,
    #[serde(borrow, default)]
    rolled_back_to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    state: Option<Cow<'a, str>>,
    #[serde(default)]
    restarts: u64,
    #[serde(borrow, default)]
    failing_probes: Vec<Cow<'a, str>>,
    #[serde(default)]
    quarantined: bool,
    #[serde(borrow, default)]
    failed_start: Option<TableStart<'a>>,
    #[serde(default)]
    behind: bool,
    #[serde(default)]
    unhealthy: bool,
}

#[derive(Deserialize)]
struct TableStart<'a> {
    #[serde(borrow)]
    version: Cow<'a, str>,
}

fn keeps(f: &Filter, h: &TableHost<'_>, s: Option<&TableService<'_>>) -> bool {
    if f.is_empty() {
        return true;
    }
    let update_failed = h.update.as_ref().is_some_and(|u| !u.ok);
    (f.stale && h.stale)
        || (f.behind && s.is_some_and(|s| s.behind))
        || (f.unhealthy && (s.is_some_and(|s| s.unhealthy) || update_failed))
        || (f.quarantined && s.is_some_and(|s| s.quarantined))
}

const HEADER: [&str; 11] = [
    "HOST",
    "TRACK",
    "SERVICE",
    "INSTALLED",
    "TRACK-VERSION",
    "STATUS",
    "STATE",
    "RESTARTS",
    "FAILING-PROBES",
    "LAST-SEEN",
    "UPDATE",
];

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n - 1).collect();
        c.push('…');
        c
    }
}

/// Whether a character must not reach a terminal as is: C0 and C1 controls, DEL (escape
/// sequences, carriage returns, newlines, bells) and the bidirectional overrides and isolates
/// that reorder what is shown.
fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every character [`is_unsafe_char`] rejects written as a `\u{..}` escape (borrowed
/// when there is none, the usual case).
pub fn printable(s: Cow<'_, str>) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe_char) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if is_unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The cells of one row, printable.
fn cells<'v>(
    h: &'v TableHost<'v>,
    svc: Option<&'v TableService<'v>>,
    seen: &'v str,
    update: &'v str,
) -> [Cow<'v, str>; 11] {
    let d = || Cow::Borrowed("-");
    let track = h.track.as_deref().map_or_else(d, Cow::Borrowed);
    let row = match svc {
        Some(x) => [
            Cow::Borrowed(&*h.host),
            track,
            Cow::Borrowed(&*x.name),
            x.installed.as_deref().map_or_else(d, Cow::Borrowed),
            x.track_version.as_deref().map_or_else(d, Cow::Borrowed),
            match (&x.status, &x.rolled_back_to) {
                (Status::RolledBack, Some(v)) => Cow::Owned(format!("rolled back to {v}")),
                (st, _) => Cow::Borrowed(st.as_str()),
            },
            match (&x.state, &x.failed_start) {
                (_, Some(f)) => Cow::Owned(format!("failed to start {}", f.version)),
                (Some(st), None) => Cow::Borrowed(&**st),
                (None, None) => d(),
            },
            Cow::Owned(x.restarts.to_string()),
            if x.failing_probes.is_empty() {
                d()
            } else {
                Cow::Owned(x.failing_probes.join(","))
            },
            Cow::Borrowed(seen),
            Cow::Borrowed(update),
        ],
        None => [
            Cow::Borrowed(&*h.host),
            track,
            d(),
            d(),
            d(),
            d(),
            d(),
            d(),
            d(),
            Cow::Borrowed(seen),
            Cow::Borrowed(update),
        ],
    };
    row.map(printable)
}

/// The summary line and the table, as printed.
fn render(
    view: &TableView<'_>,
    filter: &Filter,
    out: &mut impl std::io::Write,
) -> std::io::Result<()> {
    let s = &view.summary;
    let now = view.generated_at;
    // Per host: last seen and the update column, computed once.
    let host_cols: Vec<(String, String)> = view
        .hosts
        .iter()
        .map(|h| {
            let update = match &h.update {
                None => "-".to_string(),
                Some(u) if u.ok => "ok".to_string(),
                Some(u) => format!(
                    "failed{}: {}",
                    u.failure
                        .as_ref()
                        .map_or(String::new(), |f| format!(" ({f})")),
                    clip(u.error.as_deref().unwrap_or(""), 60)
                ),
            };
            (age(now, h.last_seen), update)
        })
        .collect();
    let rows = || {
        view.hosts
            .iter()
            .zip(&host_cols)
            .flat_map(|(h, (seen, update))| {
                let svcs: Vec<Option<&TableService<'_>>> = if h.services.is_empty() {
                    vec![None]
                } else {
                    h.services.iter().map(Some).collect()
                };
                svcs.into_iter()
                    .filter(move |svc| keeps(filter, h, *svc))
                    .map(move |svc| cells(h, svc, seen, update))
            })
    };
    // Two passes: column widths, then the lines.
    let mut widths = HEADER.map(|h| h.len());
    let mut count = 0;
    for r in rows() {
        count += 1;
        for (w, c) in widths.iter_mut().zip(&r) {
            *w = (*w).max(if c.is_ascii() {
                c.len()
            } else {
                c.chars().count()
            });
        }
    }
    writeln!(
        out,
        "{} hosts: {} reporting, {} stale, {} behind, {} unhealthy, {} quarantined, {} failed updates",
        s.hosts, s.reporting, s.stale, s.behind, s.unhealthy, s.quarantined, s.failed_updates
    )?;
    if !filter.is_empty() {
        let names: Vec<&str> = [
            (filter.behind, "behind"),
            (filter.unhealthy, "unhealthy"),
            (filter.stale, "stale"),
            (filter.quarantined, "quarantined"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| *n)
        .collect();
        writeln!(out, "{count} rows {}", names.join(" or "))?;
    }
    writeln!(out)?;
    // One line at a time into a reused buffer, then to the (buffered) output.
    let mut buf = String::with_capacity(256);
    let mut line = |out: &mut dyn std::io::Write, cells: &[&str]| {
        buf.clear();
        for (i, c) in cells.iter().enumerate() {
            buf.push_str(c);
            if i + 1 < cells.len() {
                let len = if c.is_ascii() {
                    c.len()
                } else {
                    c.chars().count()
                };
                for _ in len..widths[i] + 2 {
                    buf.push(' ');
                }
            }
        }
        buf.push('\n');
        out.write_all(buf.as_bytes())
    };
    line(out, &HEADER)?;
    for r in rows() {
        let refs: [&str; 11] = std::array::from_fn(|i| &*r[i]);
        line(out, &refs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_and_filters() {
        let json = r#"{"generated_at":1000,"stale_after":600,"summary":{"hosts":2,"reporting":1,
            "stale":1,"behind":1,"unhealthy":1,"quarantined":0,"failed_updates":0},"hosts":[
            {"host":"db1","stale":true,"services":[]},
            {"host":"web1","track":"stable","last_seen":990,"update":{"at":900,"ok":true},
             "services":[{"name":"bar","installed":"2.1-1","track_version":"2.1-1",
               "status":"rolled back","rolled_back_to":"2.0-1","state":"running"},
              {"name":"foo","installed":"1.1-1","track_version":"1.2-1","status":"behind",
               "state":"backoff","restarts":4,"failing_probes":["port","http"],
               "behind":true,"unhealthy":true}]}]}"#;
        let view: TableView<'_> = serde_json::from_str(json).unwrap();
        let text = |f: &Filter| {
            let mut out = Vec::new();
            render(&view, f, &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        let all = text(&Filter::default());
        let lines: Vec<&str> = all.lines().collect();
        assert!(lines[0].starts_with("2 hosts: 1 reporting, 1 stale, 1 behind"));
        assert!(lines[2].starts_with("HOST  TRACK   SERVICE"));
        assert!(lines[3].starts_with("db1   -       -"));
        assert!(lines[4].contains("rolled back to 2.0-1") && lines[4].ends_with("ok"));
        assert!(lines[5].contains("port,http") && lines[5].contains("10s"));
        let behind = text(&Filter {
            behind: true,
            ..Filter::default()
        });
        assert!(behind.lines().nth(1).unwrap().starts_with("1 rows behind"));
        assert_eq!(behind.lines().count(), 5);
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        let hostile = "web\u{1b}]0;owned\u{7}\u{1b}[2J\r\nfake\u{9b}31m\u{202e}gnp.exe\u{7f}";
        let shown = printable(Cow::Borrowed(hostile));
        assert!(!shown.chars().any(is_unsafe_char), "{shown:?}");
        assert_eq!(
            shown,
            "web\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\u{d}\\u{a}fake\\u{9b}31m\\u{202e}gnp.exe\\u{7f}"
        );
        assert!(matches!(
            printable(Cow::Borrowed("web1 ok – ü")),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn durations_and_urls() {
        assert_eq!(parse_duration("10m"), Ok(600));
        assert_eq!(parse_duration("90"), Ok(90));
        for d in [0, 45, 90, 600, 3600, 5400, 86_400] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert!(parse_duration("soon").is_err());
        let t = server_target("127.0.0.1:8080").unwrap();
        assert_eq!((t.tls, t.connect.as_str()), (false, "127.0.0.1:8080"));
        let t = server_target("https://fleet.example/keepup/").unwrap();
        assert_eq!(
            (t.tls, t.connect.as_str(), t.path.as_str()),
            (true, "fleet.example:443", "/keepup/")
        );
        assert!(server_target("ftp://x").is_err());
    }
}
