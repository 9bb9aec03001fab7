//! The names a report carries and the server, the page and the terminal show: service names
//! (the packager's package-name rule), probe names (the packager's check-name rule) and host
//! names. Each rule is defined once: the first two in `keepup_packager::spec`, which packs
//! what agents run, the host rule here, which `keepup host add` and the report server share.

pub use keepup_packager::spec::{is_check_name, is_package_name as is_service_name};

/// What [`is_service_name`] accepts, for error messages.
pub const SERVICE_NAME_RULE: &str =
    "2+ characters of a-z 0-9 + . -, starting with a letter or digit";
/// What [`is_check_name`] accepts, for error messages.
pub const CHECK_NAME_RULE: &str =
    "1-128 printable ASCII characters without space, quotes, backslash or < >";
/// What [`is_host_name`] accepts, for error messages.
pub const HOST_NAME_RULE: &str = "1-253 characters of A-Z a-z 0-9 - . _";

/// Host names: 1 to 253 characters of `A-Z a-z 0-9 - . _` (a DNS name or a short host name).
pub fn is_host_name(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web1", "web-1.example.com", "db_2", "A"] {
            assert!(is_host_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../etc",
            "web 1",
            "<script>",
            "web\u{1b}[31m",
            &"a".repeat(254),
        ] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
        assert!(is_service_name("foo") && !is_service_name("<foo>") && !is_service_name("f"));
        for ok in ["port", "tcp-8080", "http/healthz?a=1&b=2", "exec-check.sh"] {
            assert!(is_check_name(ok), "{ok}");
        }
        for bad in ["", "a b", "<img>", "x\"y", "x\u{7}", "é", &"a".repeat(129)] {
            assert!(!is_check_name(bad), "{bad:?}");
        }
    }
}
