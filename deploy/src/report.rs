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
use serde::{Deserialize, Serialize};

use crate::state::view::{age, Filter, FleetView, HostView, ServiceView, Status, Summary};

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

/// Where the body of a 2xx answer goes, a frame at a time as it arrives.
type OnData<'a> = &'a mut dyn FnMut(&[u8]) -> Result<()>;

/// Bytes of a refusal's body kept for its message.
const REFUSAL_KEPT: usize = 4096;

/// GET `path` from `to` over HTTP/1, plain or TLS (trusting `trust`), with the read token as
/// a bearer token; hands a 2xx answer's body to `on_data` as it arrives; returns the status
/// and, for any other, the start of its body.
async fn get(
    to: &Target,
    path: &str,
    trust: &Trust,
    token: Option<&str>,
    on_data: OnData<'_>,
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
            None => send(stream, req, on_data).await?,
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
                send(stream, req, on_data).await?
            }
        };
        Ok::<_, anyhow::Error>(resp)
    };
    tokio::time::timeout(Duration::from_secs(120), work)
        .await
        .map_err(|_| anyhow!("no complete answer within 120 s"))?
}

/// Sends `req` on a new HTTP/1 connection over `io`; hands a 2xx answer's body to
/// `on_data` frame by frame; the status and, for any other, the start of the body. A body
/// cut short (the connection closed before its end) is an error.
async fn send<I>(
    io: I,
    req: Request<Empty<Bytes>>,
    on_data: OnData<'_>,
) -> Result<(StatusCode, Bytes)>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut refusal = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::CutShort(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if status.is_success() {
            on_data(&data).map_err(ReadError::Output)?;
        } else if refusal.len() < REFUSAL_KEPT {
            refusal.extend_from_slice(&data[..data.len().min(REFUSAL_KEPT)]);
        }
    }
    conn.abort();
    Ok((status, Bytes::from(refusal)))
}

/// Why an answer's body was not read to its end, once the server had answered.
#[derive(Debug)]
enum ReadError {
    /// The connection ended before the body did.
    CutShort(String),
    /// What the body was handed to failed (stdout closed, not a fleet table).
    Output(anyhow::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::CutShort(e) => write!(
                f,
                "the answer was cut short ({e}): the server stopped sending it (see its log)"
            ),
            ReadError::Output(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ReadError {}

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

/// GET `path` (with its query) from the fleet state server at `server`, trusting `trust` for
/// `https://`, with the read token if any; the body of a 2xx answer, else an error that says
/// what to do.
pub fn fetch_path(
    server: &str,
    trust: &Trust,
    path: &str,
    read_token: Option<&str>,
) -> Result<Bytes> {
    let mut body = Vec::new();
    fetch_path_into(server, trust, path, read_token, &mut |d| {
        body.extend_from_slice(d);
        Ok(())
    })?;
    Ok(Bytes::from(body))
}

/// [`fetch_path`], handing the body to `on_data` as it arrives instead of keeping it. An
/// error of `on_data`, or a body cut short, stops the transfer and is returned; what was
/// handed over before stays handed over.
pub fn fetch_path_into(
    server: &str,
    trust: &Trust,
    path: &str,
    read_token: Option<&str>,
    on_data: OnData<'_>,
) -> Result<()> {
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
    let (status, body) = match rt.block_on(get(&to, &path, trust, read_token, on_data)) {
        Err(e) if e.is::<ReadError>() => return Err(e.context(format!("reading {url}"))),
        r => r,
    }
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
    Ok(())
}

/// The first line of the table form of the fleet view (`GET /api/v1/fleet?form=table`):
/// what the lines above the table say, and the width of each column. The rows follow, one a
/// line, their [`HEADER`] cells separated by tabs (cells are printable: no tab or newline).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TableHead {
    /// Unix time the view was built.
    pub generated_at: u64,
    /// Counts over all hosts.
    pub summary: Summary,
    /// Rows that follow.
    pub rows: usize,
    /// Widths of the columns, in characters (the header's included).
    pub widths: Vec<usize>,
}

/// The names of the rows `filter` selects, as the table query and the heading spell them.
fn row_names(filter: &Filter) -> Vec<&'static str> {
    [
        (filter.behind, "behind"),
        (filter.unhealthy, "unhealthy"),
        (filter.stale, "stale"),
        (filter.quarantined, "quarantined"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, n)| *n)
    .collect()
}

/// The query that asks for the table form with `filter`'s rows only.
pub fn table_query(filter: &Filter) -> String {
    format!("&form=table&rows={}", row_names(filter).join(","))
}

/// The filter of a table query's `rows=` value (names as [`table_query`] writes them).
pub fn parse_rows(v: &str) -> Filter {
    let mut f = Filter::default();
    for n in v.split(',') {
        match n {
            "behind" => f.behind = true,
            "unhealthy" => f.unhealthy = true,
            "stale" => f.stale = true,
            "quarantined" => f.quarantined = true,
            _ => {}
        }
    }
    f
}

/// `keepup report`.
pub fn run(o: &ReportOptions) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    if o.json {
        let path = format!("{FLEET_PATH}?stale_after={}", o.stale_after);
        if o.filter.is_empty() {
            // As it arrives: a body cut short fails here (and is no valid JSON on stdout).
            fetch_path_into(
                &o.server,
                &o.trust,
                &path,
                o.read_token.as_deref(),
                &mut |d| out.write_all(d).context("writing to stdout"),
            )?;
        } else {
            let body = fetch_path(&o.server, &o.trust, &path, o.read_token.as_deref())?;
            let mut view: FleetView = serde_json::from_slice(&body)
                .with_context(|| format!("{}: the answer is not a fleet view", o.server))?;
            for h in &mut view.hosts {
                let host = h.clone();
                h.services.retain(|s| o.filter.keeps(&host, Some(s)));
            }
            view.hosts
                .retain(|h| !h.services.is_empty() || o.filter.keeps(h, None));
            serde_json::to_writer(&mut out, &view)?;
        }
        out.write_all(b"\n")?;
        out.flush()?;
        return Ok(());
    }
    // The table form: the server picks and renders the rows; this pads them as they arrive.
    let path = format!(
        "{FLEET_PATH}?stale_after={}&events=0{}",
        o.stale_after,
        table_query(&o.filter)
    );
    let mut table = TableReader::new(&o.filter, &mut out);
    fetch_path_into(
        &o.server,
        &o.trust,
        &path,
        o.read_token.as_deref(),
        &mut |d| {
            table
                .take(d)
                .with_context(|| format!("{}: the answer is not a fleet table", o.server))
        },
    )?;
    let old = table.finish()?;
    if let Some(body) = old {
        // A server from before the table form answered with the JSON view.
        let view: FleetView = serde_json::from_slice(&body)
            .with_context(|| format!("{}: the answer is not a fleet view", o.server))?;
        let mut rows = Vec::new();
        let mut widths = HEADER.map(str::len);
        let n = table_rows(
            &view.hosts,
            view.generated_at,
            &o.filter,
            &mut rows,
            &mut widths,
        );
        let head = TableHead {
            generated_at: view.generated_at,
            summary: view.summary,
            rows: n,
            widths: widths.to_vec(),
        };
        let mut table = TableReader::new(&o.filter, &mut out);
        table.head(head)?;
        table.take(&rows)?;
        table.finish()?;
    }
    out.flush()?;
    Ok(())
}

/// Reads the table form as it arrives and prints it: the head line, then each complete
/// row, padded; a row cut by a frame's end waits for the rest.
struct TableReader<'f, W: std::io::Write> {
    filter: &'f Filter,
    out: W,
    /// The widths of the columns, once the head was read.
    widths: Option<Vec<usize>>,
    /// The start of a line whose end has not arrived.
    carry: Vec<u8>,
}

impl<'f, W: std::io::Write> TableReader<'f, W> {
    fn new(filter: &'f Filter, out: W) -> Self {
        TableReader {
            filter,
            out,
            widths: None,
            carry: Vec::new(),
        }
    }

    /// Print the summary lines and the header of the table `head` announces.
    fn head(&mut self, head: TableHead) -> Result<()> {
        let s = &head.summary;
        let out = &mut self.out;
        writeln!(
            out,
            "{} hosts: {} reporting, {} stale, {} behind, {} unhealthy, {} quarantined, {} failed updates",
            s.hosts, s.reporting, s.stale, s.behind, s.unhealthy, s.quarantined, s.failed_updates
        )?;
        if !self.filter.is_empty() {
            writeln!(
                out,
                "{} rows {}",
                head.rows,
                row_names(self.filter).join(" or ")
            )?;
        }
        writeln!(out)?;
        let widths: Vec<usize> = (0..HEADER.len())
            .map(|i| head.widths.get(i).copied().unwrap_or(0))
            .collect();
        print_row(&mut self.out, &widths, HEADER.join("\t").as_bytes())?;
        self.widths = Some(widths);
        Ok(())
    }

    /// One complete line: the head, or a row.
    fn line(&mut self, line: &[u8]) -> Result<()> {
        match &self.widths {
            Some(w) => {
                if !line.is_empty() {
                    print_row(&mut self.out, w, line)?;
                }
                Ok(())
            }
            None => self.head(serde_json::from_slice(line)?),
        }
    }

    /// The next bytes of the answer.
    fn take(&mut self, mut data: &[u8]) -> Result<()> {
        if !self.carry.is_empty() {
            let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                self.carry.extend_from_slice(data);
                return Ok(());
            };
            let mut line = std::mem::take(&mut self.carry);
            line.extend_from_slice(&data[..nl]);
            self.line(&line)?;
            line.clear();
            self.carry = line;
            data = &data[nl + 1..];
        }
        let mut rest = data;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            self.line(&rest[..nl])?;
            rest = &rest[nl + 1..];
        }
        self.carry.extend_from_slice(rest);
        Ok(())
    }

    /// The answer ended: print what is left. Returns the whole answer if it was a line
    /// without an end that came before any head: an older server's JSON view.
    fn finish(mut self) -> Result<Option<Vec<u8>>> {
        if self.widths.is_none() {
            return Ok(Some(std::mem::take(&mut self.carry)));
        }
        let rest = std::mem::take(&mut self.carry);
        self.line(&rest)?;
        self.out.flush()?;
        Ok(None)
    }
}

/// Spaces to pad cells with.
const SPACES: [u8; 64] = [b' '; 64];

/// Print one row of tab-separated cells padded to `widths`, each cell checked again before
/// it reaches the terminal. Rows of printable ASCII (nearly all) are padded as they are.
fn print_row(out: &mut impl std::io::Write, widths: &[usize], row: &[u8]) -> std::io::Result<()> {
    let pad = |out: &mut dyn std::io::Write, mut n: usize| -> std::io::Result<()> {
        while n > 0 {
            let k = n.min(SPACES.len());
            out.write_all(&SPACES[..k])?;
            n -= k;
        }
        Ok(())
    };
    let plain = row.iter().all(|&b| (0x20..0x7f).contains(&b) || b == b'\t');
    let mut n = 0;
    for (i, c) in row.split(|&b| b == b'\t').enumerate() {
        if i > 0 {
            let w = widths.get(i - 1).map_or(0, |w| w + 2);
            pad(out, w.saturating_sub(n).max(1))?;
        }
        if plain {
            n = c.len();
            out.write_all(c)?;
        } else {
            let c = printable(String::from_utf8_lossy(c));
            n = width(&c);
            out.write_all(c.as_bytes())?;
        }
    }
    out.write_all(b"\n")
}

/// The column headers of the table.
pub const HEADER: [&str; 11] = [
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

/// `s` cut to `n` characters, the last one `…` when cut.
/// The UPDATE cell of a host whose last update pass ran: `ok`, or `failed (why): error`
/// (the error clipped to 60 characters).
pub(crate) fn update_cell(
    ok: bool,
    failure: Option<&keepup_deploy::wire::UpdateFailure>,
    error: Option<&str>,
) -> String {
    if ok {
        return "ok".into();
    }
    format!(
        "failed{}: {}",
        failure.map_or(String::new(), |f| format!(" ({f})")),
        clip(error.unwrap_or(""), 60)
    )
}

pub(crate) fn clip(s: &str, n: usize) -> String {
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
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) || !s.chars().any(is_unsafe_char) {
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
    h: &'v HostView,
    svc: Option<&'v ServiceView>,
    seen: &'v str,
    update: &'v str,
) -> [Cow<'v, str>; 11] {
    let d = || Cow::Borrowed("-");
    let track = h.track.as_deref().map_or_else(d, Cow::Borrowed);
    let row = match svc {
        Some(x) => [
            Cow::Borrowed(h.host.as_str()),
            track,
            Cow::Borrowed(x.name.as_str()),
            x.installed.as_deref().map_or_else(d, Cow::Borrowed),
            x.track_version.as_deref().map_or_else(d, Cow::Borrowed),
            match (&x.status, &x.rolled_back_to) {
                (Status::RolledBack, Some(v)) => Cow::Owned(format!("rolled back to {v}")),
                (st, _) => Cow::Borrowed(st.as_str()),
            },
            match (&x.state, &x.failed_start) {
                (_, Some(f)) => Cow::Owned(format!("failed to start {}", f.version)),
                (Some(st), None) => Cow::Borrowed(st.as_str()),
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
            Cow::Borrowed(h.host.as_str()),
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

/// Characters shown for `c`.
pub(crate) fn width(c: &str) -> usize {
    if c.is_ascii() {
        c.len()
    } else {
        c.chars().count()
    }
}

/// Append the rows of `hosts` that `filter` keeps to `out` (cells separated by tabs, one row
/// a line), widen `widths` to fit them; returns how many rows were appended. The server
/// renders the table form with it; `keepup report` too, from an older server's JSON.
pub fn table_rows(
    hosts: &[HostView],
    now: u64,
    filter: &Filter,
    out: &mut Vec<u8>,
    widths: &mut [usize; 11],
) -> usize {
    let mut count = 0;
    for h in hosts {
        let update = match &h.update {
            None => "-".to_string(),
            Some(u) => update_cell(u.ok, u.failure.as_ref(), u.error.as_deref()),
        };
        let seen = age(now, h.last_seen);
        let mut row = |svc: Option<&ServiceView>| {
            if !filter.keeps(h, svc) {
                return;
            }
            count += 1;
            for (i, c) in cells(h, svc, &seen, &update).iter().enumerate() {
                if i > 0 {
                    out.push(b'\t');
                }
                widths[i] = widths[i].max(width(c));
                out.extend_from_slice(c.as_bytes());
            }
            out.push(b'\n');
        };
        if h.services.is_empty() {
            row(None);
        } else {
            for s in &h.services {
                row(Some(s));
            }
        }
    }
    count
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
        let view: FleetView = serde_json::from_str(json).unwrap();
        // As the server renders the table form and `keepup report` pads it.
        let text = |f: &Filter| {
            let mut rows = Vec::new();
            let mut widths = HEADER.map(str::len);
            let n = table_rows(&view.hosts, view.generated_at, f, &mut rows, &mut widths);
            let head = TableHead {
                generated_at: view.generated_at,
                summary: view.summary.clone(),
                rows: n,
                widths: widths.to_vec(),
            };
            let wire = format!(
                "{}\n{}",
                serde_json::to_string(&head).unwrap(),
                String::from_utf8(rows).unwrap()
            );
            // As it arrives, in frames that cut lines anywhere.
            let mut out = Vec::new();
            let mut t = TableReader::new(f, &mut out);
            for part in wire.as_bytes().chunks(7) {
                t.take(part).unwrap();
            }
            assert!(t.finish().unwrap().is_none());
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
