//! `food`: the example service ("foo daemon") that keepup's fleet tests package and supervise.
//!
//! It runs in the foreground and logs one line per event to stdout. It serves a one-line TCP
//! banner (`food <version> ready`) and a tiny HTTP server (`GET /healthz`), and can misbehave
//! on request so the supervisor and health checks have something to catch: crash after a
//! while, hang (keep accepting, never answer), fail its health check, or double-fork away from
//! its parent like an old-style daemon.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const VERSION: &str = env!("CARGO_PKG_VERSION");
const USAGE: &str = "usage: food [--config FILE] [--bind ADDR] [--banner-port N] [--http-port N]
            [--banner TEXT] [--crash-after SECS] [--hang-after SECS] [--fail-health]
            [--daemonize] [--ready-after SECS] [--watchdog-stop-file FILE]
            [--events-file FILE] [--notify-log FILE] [--version]";

/// Set once `--hang-after` expires: from then on connections are accepted and held, unanswered.
static HUNG: AtomicBool = AtomicBool::new(false);
static HELD: Mutex<Vec<TcpStream>> = Mutex::new(Vec::new());

#[derive(Debug)]
struct Opts {
    bind: String,
    banner_port: u16,
    http_port: u16,
    banner: String,
    crash_after: Option<u64>,
    hang_after: Option<u64>,
    fail_health: bool,
    daemonize: bool,
    /// With `NOTIFY_SOCKET` set: send `READY=1` this long after start (sd_notify).
    ready_after: Option<u64>,
    /// With `WATCHDOG_USEC` set: `WATCHDOG=1` pings stop while this file exists.
    watchdog_stop_file: Option<String>,
    /// Appends `<banner port> start` at start and `<banner port> stop` on SIGTERM.
    events_file: Option<String>,
    /// Appends `<what> <CLOCK_REALTIME ns> <CLOCK_MONOTONIC ns>` at start (`start`), right
    /// before each `READY=1` (`ready`) and `WATCHDOG=1` (`watchdog`), and when the pings stop
    /// (`watchdog-stop`): what the readiness benchmark measures the supervisor against.
    notify_log: Option<String>,
}

fn main() {
    let opts = parse_args(std::env::args().skip(1).collect()).unwrap_or_else(|e| {
        eprintln!("food: {e}\n{USAGE}");
        std::process::exit(2)
    });
    if let Some(file) = &opts.events_file {
        on_term_record(file.clone(), opts.banner_port);
    }
    stamp(&opts.notify_log, "start");
    let banner = listen(&opts.bind, opts.banner_port);
    let http = listen(&opts.bind, opts.http_port);
    if opts.daemonize {
        daemonize();
    }
    log(&format!(
        "food {VERSION} pid {} serving banner on {}:{} and http on {}:{}",
        std::process::id(),
        opts.bind,
        opts.banner_port,
        opts.bind,
        opts.http_port
    ));
    let text = format!("{}\n", opts.banner);
    std::thread::spawn(move || serve(banner, move |c| answer_banner(c, &text)));
    let fail = opts.fail_health;
    std::thread::spawn(move || serve(http, move |c| answer_http(c, fail)));
    notify(&opts);
    if let Some(secs) = opts.hang_after {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            HUNG.store(true, Ordering::SeqCst);
            log("hanging as asked: connections are accepted but never answered");
        });
    }
    if let Some(secs) = opts.crash_after {
        std::thread::sleep(Duration::from_secs(secs));
        log("crashing as asked");
        std::process::exit(3);
    }
    loop {
        std::thread::park();
    }
}

/// Speaks systemd's notify protocol when `NOTIFY_SOCKET` is set: `READY=1` after
/// `--ready-after`, then `WATCHDOG=1` every third of `WATCHDOG_USEC` unless the stop file exists.
fn notify(opts: &Opts) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = move |msg: &str| {
        let s = std::os::unix::net::UnixDatagram::unbound()?;
        s.send_to(msg.as_bytes(), &socket).map(|_| ())
    };
    let after = opts.ready_after.unwrap_or(0);
    let stop = opts.watchdog_stop_file.clone();
    let stamps = opts.notify_log.clone();
    let every = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|u| u.parse::<u64>().ok())
        .map(|u| Duration::from_micros(u / 3));
    std::thread::spawn(move || {
        let _ = send(&format!("STATUS=warming up for {after}s\n"));
        std::thread::sleep(Duration::from_secs(after));
        stamp(&stamps, "ready");
        match send("READY=1\nSTATUS=serving\n") {
            Ok(()) => log("sent READY=1"),
            Err(e) => log(&format!("cannot send READY=1: {e}")),
        }
        let Some(every) = every else { return };
        let mut said = false;
        loop {
            std::thread::sleep(every);
            if stop
                .as_deref()
                .is_some_and(|f| std::path::Path::new(f).exists())
            {
                if !said {
                    stamp(&stamps, "watchdog-stop");
                    log("watchdog pings stopped as asked");
                    said = true;
                }
                continue;
            }
            stamp(&stamps, "watchdog");
            let _ = send("WATCHDOG=1");
        }
    });
}

/// Appends `<what> <CLOCK_REALTIME ns> <CLOCK_MONOTONIC ns>` to `file` (`--notify-log`), in
/// one write, so lines from several threads never interleave.
fn stamp(file: &Option<String>, what: &str) {
    use nix::libc;
    let Some(file) = file else { return };
    let ns = |clock| {
        let mut t = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime(2) writes one timespec into `t`, which lives on this stack.
        unsafe { libc::clock_gettime(clock, &mut t) };
        t.tv_sec as i128 * 1_000_000_000 + t.tv_nsec as i128
    };
    let line = format!(
        "{what} {} {}\n",
        ns(libc::CLOCK_REALTIME),
        ns(libc::CLOCK_MONOTONIC)
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Records `<port> start` in `file` now and `<port> stop` when SIGTERM comes (then exits).
fn on_term_record(file: String, port: u16) {
    use nix::sys::signal::{SigSet, Signal};
    let append = move |what: &str| {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
        {
            let _ = writeln!(f, "{port} {what}");
        }
    };
    append("start");
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    // Blocked before any thread starts, so every thread inherits the mask and only the
    // waiting thread takes the signal.
    let _ = set.thread_block();
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            append("stop");
            std::process::exit(0);
        }
    });
}

fn parse_args(args: Vec<String>) -> Result<Opts, String> {
    let mut o = Opts {
        bind: "0.0.0.0".into(),
        banner_port: 7070,
        http_port: 7071,
        banner: format!("food {VERSION} ready"),
        crash_after: None,
        hang_after: None,
        fail_health: false,
        daemonize: false,
        ready_after: None,
        watchdog_stop_file: None,
        events_file: None,
        notify_log: None,
    };
    // The config file comes first so that flags override it, wherever --config appears.
    if let Some(i) = args.iter().position(|a| a == "--config") {
        let file = args.get(i + 1).ok_or("--config needs a FILE")?;
        let text = std::fs::read_to_string(file).map_err(|e| format!("reading {file}: {e}"))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("{file}:{}: expected `key = value`", n + 1))?;
            set(&mut o, key.trim(), value.trim()).map_err(|e| format!("{file}:{}: {e}", n + 1))?;
        }
    }
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--version" => {
                println!("food {VERSION}");
                std::process::exit(0);
            }
            "--fail-health" => o.fail_health = true,
            "--daemonize" => o.daemonize = true,
            "--config" => {
                it.next();
            }
            flag if flag.starts_with("--") => {
                let value = it.next().ok_or(format!("{flag} needs a value"))?;
                set(&mut o, &flag[2..].replace('-', "_"), &value)?;
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(o)
}

/// Sets one option by its config-file key (flags map `--banner-port` to `banner_port`).
fn set(o: &mut Opts, key: &str, value: &str) -> Result<(), String> {
    let num = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| format!("{key}: {v:?} is not a number"))
    };
    let port = |v: &str| {
        v.parse::<u16>()
            .map_err(|_| format!("{key}: {v:?} is not a port"))
    };
    match key {
        "bind" => o.bind = value.to_string(),
        "banner_port" => o.banner_port = port(value)?,
        "http_port" => o.http_port = port(value)?,
        "banner" => o.banner = value.to_string(),
        "crash_after" => o.crash_after = Some(num(value)?),
        "hang_after" => o.hang_after = Some(num(value)?),
        "ready_after" => o.ready_after = Some(num(value)?),
        "watchdog_stop_file" => o.watchdog_stop_file = Some(value.to_string()),
        "events_file" => o.events_file = Some(value.to_string()),
        "notify_log" => o.notify_log = Some(value.to_string()),
        _ => return Err(format!("unknown option {key:?}")),
    }
    Ok(())
}

fn listen(bind: &str, port: u16) -> TcpListener {
    TcpListener::bind((bind, port)).unwrap_or_else(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            eprintln!("food: port {port} on {bind} is already in use (is another food running?)");
        } else {
            eprintln!("food: cannot listen on {bind}:{port}: {e}");
        }
        std::process::exit(1)
    })
}

/// Double-forks like an old-style daemon: the original process and the first child exit 0,
/// the grandchild (in a new session, re-parented away from the caller) keeps serving.
fn daemonize() {
    use nix::unistd::{fork, setsid, ForkResult};
    // SAFETY: called before any thread is spawned, so the child is a full copy of us.
    let step = || match unsafe { fork() } {
        Ok(ForkResult::Parent { .. }) => unsafe { nix::libc::_exit(0) },
        Ok(ForkResult::Child) => {}
        Err(e) => {
            eprintln!("food: fork failed: {e}");
            std::process::exit(1)
        }
    };
    step();
    setsid().expect("setsid in a fresh child");
    step();
    let _ = std::env::set_current_dir("/");
}

fn serve<F>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> std::io::Result<()> + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        if HUNG.load(Ordering::SeqCst) {
            HELD.lock().unwrap().push(conn);
            continue;
        }
        let handle = handle.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(conn) {
                log(&format!("connection error: {e}"));
            }
        });
    }
}

fn answer_banner(mut conn: TcpStream, text: &str) -> std::io::Result<()> {
    log(&format!("banner to {}", conn.peer_addr()?));
    conn.write_all(text.as_bytes())
}

fn answer_http(mut conn: TcpStream, fail_health: bool) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16384 {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    if HUNG.load(Ordering::SeqCst) {
        HELD.lock().unwrap().push(conn);
        return Ok(());
    }
    let head = String::from_utf8_lossy(&req);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/healthz") if fail_health => ("500 Internal Server Error", "unhealthy\n"),
        ("GET", "/healthz") => ("200 OK", "ok\n"),
        _ => ("404 Not Found", "not found\n"),
    };
    log(&format!(
        "http {method} {path} from {} -> {status}",
        conn.peer_addr()?
    ));
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes())
}

fn log(line: &str) {
    println!("{line}");
}
