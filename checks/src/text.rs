//! Small text helpers shared by the probes: durations, byte snippets, I/O errors, regexes.

use std::io;
use std::time::Duration;

use crate::ProbeError;

/// Formats a duration for reasons: `2s`, `1.5s`, `250ms`.
pub(crate) fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        let s = format!("{:.3}", d.as_secs_f64());
        format!("{}s", s.trim_end_matches('0'))
    }
}

/// Quotes up to `max` characters of `bytes` (lossy UTF-8, escaped) for a reason.
pub(crate) fn snippet(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    format!("\"{out}\"")
}

/// The first non-blank line of `bytes`, trimmed and cut to `max` characters.
pub(crate) fn first_line(bytes: &[u8], max: usize) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut out: String = line.chars().take(max).collect();
    if line.chars().nth(max).is_some() {
        out.push('…');
    }
    Some(out)
}

/// Describes an I/O error without the `(os error N)` noise for the common network cases.
pub(crate) fn io_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::ConnectionAborted => "connection aborted".into(),
        io::ErrorKind::BrokenPipe => "broken pipe (peer closed the connection)".into(),
        io::ErrorKind::NotFound => "not found".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

/// Compiles a byte-oriented regex, naming `what` it is for in the error.
///
/// Unicode mode is off: `\d`, `\w`, `\s`, `.` and `(?i)` are ASCII/byte-based, which suits
/// protocol banners and keeps the Unicode tables out of the binary.
pub(crate) fn regex(what: &'static str, pattern: &str) -> Result<regex::bytes::Regex, ProbeError> {
    regex::bytes::RegexBuilder::new(pattern)
        .unicode(false)
        .build()
        .map_err(|e| ProbeError::InvalidRegex {
            what,
            pattern: pattern.to_owned(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration(Duration::from_secs(2)), "2s");
        assert_eq!(duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_millis(1234)), "1.234s");
    }

    #[test]
    fn regexes_are_ascii_and_byte_based() {
        let re = regex("banner", r"(?i)^\+ok \w+ \d+\s").unwrap();
        assert!(re.is_match(b"+OK pop3_v2 110 ready"));
        assert!(regex("banner", "caf\u{e9}")
            .unwrap()
            .is_match("café".as_bytes()));
        assert!(regex("banner", "a.c").unwrap().is_match(b"a\xffc"));
        let err = regex("body", "(").unwrap_err();
        assert!(matches!(err, ProbeError::InvalidRegex { what: "body", .. }));
    }

    #[test]
    fn snippets_and_lines() {
        assert_eq!(snippet(b"ab\r\n", 10), "\"ab\\r\\n\"");
        assert_eq!(snippet(b"abcdef", 3), "\"abc…\"");
        assert_eq!(
            first_line(b"\n  \n hello \nworld", 80).as_deref(),
            Some("hello")
        );
        assert_eq!(first_line(b"  \n", 80), None);
        assert_eq!(first_line(b"abcdef", 2).as_deref(), Some("ab…"));
    }
}
