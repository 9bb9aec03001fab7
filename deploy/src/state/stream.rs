//! The fleet view's answers sent as they are built ([`json`], [`table`]): a blocking thread
//! makes the body a slice of hosts at a time and
//! hands each part over a small bounded channel to the response ([`Streamed`]), so the
//! server holds a few parts, never the whole answer (the fleet view of a million hosts is a
//! gigabyte of JSON). The body goes out with chunked transfer encoding and ends with its
//! last chunk only once the builder said it is complete: a builder that stops early (an
//! error, a panic) makes the body fail, so hyper closes the connection without the final
//! chunk and the client sees a truncated answer, never one that looks whole.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Bytes, Frame};
use tokio::sync::mpsc;

use super::rows::{self, Counts, Snapshot};
use super::view::{self, Filter, HostView, Policy};
use crate::report;

/// Hosts per slice of a fleet view built or rendered at once.
const VIEW_SLICE: usize = 4096;

/// Where the parts of an answer go, in order ([`Sink::send`] for a response).
pub type Out<'s> = &'s mut dyn FnMut(Vec<u8>) -> Result<(), Gone>;

/// Calls `each` with every slice of [`VIEW_SLICE`] hosts of `snapshot`, on every core, and
/// `take` with what it made of them in host order, as soon as the slices before are taken
/// (at most one slice per core waits). Stops when `take` says so.
pub fn in_order<T: Send>(
    snapshot: &[Snapshot],
    each: impl Fn(&[Snapshot]) -> T + Sync,
    mut take: impl FnMut(T) -> Result<(), Gone>,
) -> Result<(), Gone> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let slices: Vec<&[Snapshot]> = snapshot.chunks(VIEW_SLICE).collect();
    for group in slices.chunks(threads) {
        let made: Vec<Option<T>> = std::thread::scope(|sc| {
            let handles: Vec<_> = group.iter().map(|part| sc.spawn(|| each(part))).collect();
            handles.into_iter().map(|h| h.join().ok()).collect()
        });
        for m in made {
            // A slice whose thread panicked: the answer cannot be whole.
            take(m.ok_or(Gone)?)?;
        }
    }
    Ok(())
}

/// The counts of the hosts of `snapshot` and of the rows `filter` keeps, from the rows kept
/// in their summaries, on every core.
pub fn counts<'a>(
    snapshot: &'a [Snapshot],
    policy: &Policy<'a>,
    now: u64,
    stale_after: u64,
    filter: &Filter,
) -> Counts {
    let mut all = Counts::default();
    let _ = in_order(
        snapshot,
        |part| rows::count(part, policy, now, stale_after, filter),
        |c| {
            all.add(&c);
            Ok(())
        },
    );
    all
}

/// The fleet view of `snapshot` at `now` as JSON, into `send` a slice of hosts at a time:
/// the head (its summary counted first, from the kept rows), then each slice's hosts as they
/// are built (`events` fills their events). The bytes are those of the whole
/// [`view::FleetView`] serialized at once.
pub fn json<'a>(
    snapshot: &'a [Snapshot],
    policy: &Policy<'a>,
    now: u64,
    stale_after: u64,
    events: &(dyn Fn(&mut [HostView]) + Sync),
    send: Out<'_>,
) -> Result<(), Gone> {
    let counts = counts(snapshot, policy, now, stale_after, &Filter::default());
    let head = view::FleetView {
        generated_at: now,
        stale_after,
        fleet_serial: policy.fleet.map(|f| f.serial),
        summary: counts.summary,
        hosts: Vec::new(),
    };
    // `hosts` is the last field: open its array, send the slices, close it.
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    out.truncate(out.len().saturating_sub(2));
    send(out)?;
    let mut first = true;
    in_order(
        snapshot,
        |part| {
            let mut v = view::build(part, policy, now, stale_after);
            events(&mut v.hosts);
            let mut buf = Vec::with_capacity(v.hosts.len() * 600 + 1);
            for h in &v.hosts {
                buf.push(b',');
                let _ = serde_json::to_writer(&mut buf, h);
            }
            buf
        },
        |mut buf| {
            if first && !buf.is_empty() {
                buf.remove(0);
                first = false;
            }
            send(buf)
        },
    )?;
    send(b"]}".to_vec())
}

/// The table form (`keepup report`) of `snapshot` at `now`, into `send`: a
/// [`report::TableHead`] line, then the rows `filter` keeps, a slice of hosts at a time, from
/// the rows kept in the hosts' summaries.
pub fn table<'a>(
    snapshot: &'a [Snapshot],
    policy: &Policy<'a>,
    now: u64,
    stale_after: u64,
    filter: &Filter,
    send: Out<'_>,
) -> Result<(), Gone> {
    let counts = counts(snapshot, policy, now, stale_after, filter);
    let head = report::TableHead {
        generated_at: now,
        widths: rows::head_widths(&counts),
        summary: counts.summary,
        rows: counts.rows,
    };
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    out.push(b'\n');
    send(out)?;
    in_order(
        snapshot,
        |part| {
            let mut buf = Vec::new();
            rows::write(part, policy, now, stale_after, filter, &mut buf);
            buf
        },
        send,
    )
}

/// Parts in flight between the builder and the connection.
const PARTS_IN_FLIGHT: usize = 4;

/// What the builder sends.
enum Part {
    Data(Bytes),
    /// The body is complete.
    End,
}

/// The builder's end: [`Sink::send`] each part in order, then [`Sink::finish`].
pub struct Sink {
    tx: mpsc::Sender<Part>,
}

/// The client went away: stop building.
#[derive(Debug)]
pub struct Gone;

impl Sink {
    /// Hand over the next part (waits while [`PARTS_IN_FLIGHT`] are queued). Call from a
    /// blocking thread.
    pub fn send(&self, data: Vec<u8>) -> Result<(), Gone> {
        if data.is_empty() {
            return Ok(());
        }
        self.tx
            .blocking_send(Part::Data(Bytes::from(data)))
            .map_err(|_| Gone)
    }

    /// The body is complete.
    pub fn finish(self) {
        let _ = self.tx.blocking_send(Part::End);
    }
}

/// The response's end: a body whose frames are the parts, in order.
pub struct Streamed {
    rx: mpsc::Receiver<Part>,
    done: bool,
}

/// A streamed body and the sink that fills it.
pub fn channel() -> (Sink, Streamed) {
    let (tx, rx) = mpsc::channel(PARTS_IN_FLIGHT);
    (Sink { tx }, Streamed { rx, done: false })
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Part::Data(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Part::End)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(Some(Err(io::Error::other(
                    "the answer stopped before its end (see the server's log)",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn collect(body: Streamed) -> Result<Vec<u8>, io::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { body.collect().await.map(|b| b.to_bytes().to_vec()) })
    }

    #[test]
    fn a_finished_body_is_whole_and_a_stopped_one_fails() {
        let (sink, body) = channel();
        let t = std::thread::spawn(move || {
            sink.send(b"[1,".to_vec()).unwrap();
            sink.send(Vec::new()).unwrap();
            sink.send(b"2]".to_vec()).unwrap();
            sink.finish();
        });
        assert_eq!(collect(body).unwrap(), b"[1,2]");
        t.join().unwrap();

        let (sink, body) = channel();
        let t = std::thread::spawn(move || {
            sink.send(b"[1,".to_vec()).unwrap();
            drop(sink);
        });
        let e = collect(body).unwrap_err();
        assert!(e.to_string().contains("stopped before its end"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn the_streamed_json_is_the_view_serialized_at_once() {
        use keepup_deploy::wire::{Event, Fleet, Format, Index, PoolEntry, Report, ServiceReport};
        use std::sync::Arc;
        let mut fleet = Fleet::default();
        fleet.assign("h*", "stable", vec![]).unwrap();
        fleet.quarantine("bar", "h00007*").unwrap();
        let pool = |name: &str, version: &str| PoolEntry {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            format: Format::Deb,
            path: format!("pool/{name}_{version}.deb"),
            size: 1,
            sha256: "00".into(),
            rollback_of: None,
        };
        let index = Index {
            track: "stable".into(),
            serial: 4,
            generated: 0,
            expires: None,
            packages: vec![pool("foo", "1.2-1"), pool("bar", "2.1-1")],
            rollouts: vec![],
            rollout_key: None,
        };
        let mut policy = Policy {
            fleet: Some(&fleet),
            stamp: 99,
            ..Policy::default()
        };
        policy.indexes.insert("stable", &index);
        // More than two slices; every third host never reported, some are stale.
        let snapshot: Vec<Snapshot> = (0..9000)
            .map(|i| {
                let name = format!("h{i:06}");
                let entry = (i % 3 != 0).then(|| {
                    let mut r = Report {
                        host: name.clone(),
                        format: Some(Format::Deb),
                        ..Report::default()
                    };
                    let v = if i % 5 == 0 { "1.1-1" } else { "1.2-1" };
                    r.installed.insert("foo".into(), v.into());
                    r.services.push(ServiceReport {
                        name: "foo".into(),
                        version: v.into(),
                        state: if i % 7 == 0 { "backoff" } else { "running" }.into(),
                        ..ServiceReport::default()
                    });
                    Arc::new(super::super::entry::HostEntry::of(&r, 1000 + i % 700))
                });
                (name, entry)
            })
            .collect();
        let events = |hosts: &mut [HostView]| {
            for h in hosts.iter_mut().filter(|h| h.host.ends_with('7')) {
                h.events.push(Event {
                    at: 5,
                    service: None,
                    kind: "k".into(),
                    message: format!("m {}", h.host),
                });
            }
        };
        let now = 1650;
        let mut streamed = Vec::new();
        let mut parts = 0;
        json(&snapshot, &policy, now, 600, &events, &mut |b| {
            parts += 1;
            streamed.extend_from_slice(&b);
            Ok(())
        })
        .unwrap();
        assert!(parts >= 4, "{parts} parts: head, 3 slices, tail");
        let mut whole = view::build(&snapshot, &policy, now, 600);
        events(&mut whole.hosts);
        let whole = serde_json::to_vec(&whole).unwrap();
        assert_eq!(
            String::from_utf8(streamed).unwrap(),
            String::from_utf8(whole).unwrap()
        );

        // No host at all: still the same bytes.
        let mut empty = Vec::new();
        json(&[], &policy, now, 600, &events, &mut |b| {
            empty.extend_from_slice(&b);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            empty,
            serde_json::to_vec(&view::build(&[], &policy, now, 600)).unwrap()
        );

        // A client gone: the building stops at the next part.
        let mut sent = 0;
        let r = json(&snapshot, &policy, now, 600, &events, &mut |_| {
            sent += 1;
            if sent == 2 {
                Err(Gone)
            } else {
                Ok(())
            }
        });
        assert!(r.is_err() && sent == 2);
    }
}
