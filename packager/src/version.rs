//! Version ordering as dpkg and rpm define it, and the rollback version rule: a rollback is
//! published as `<current upstream>+rb<N>` with the current release, which both orderings rank
//! above the current version (and above earlier rollbacks). The repository uses it to publish
//! rollbacks, the agent to never downgrade; it needs no packaging code, so it is always built.

use std::cmp::Ordering;

/// dpkg's ordering of full versions (`[epoch:]upstream[-revision]`).
pub fn dpkg_cmp(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = dpkg_split(a);
    let (eb, ub, rb) = dpkg_split(b);
    ea.cmp(&eb)
        .then_with(|| dpkg_verrevcmp(ua, ub))
        .then_with(|| dpkg_verrevcmp(ra, rb))
}

fn dpkg_split(v: &str) -> (u64, &str, &str) {
    let (epoch, rest) = match v.split_once(':') {
        Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
        _ => (0, v),
    };
    match rest.rsplit_once('-') {
        Some((u, r)) => (epoch, u, r),
        None => (epoch, rest, ""),
    }
}

fn dpkg_order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(c) => c as i32 + 256,
    }
}

/// dpkg's `verrevcmp` (lib/dpkg/version.c).
fn dpkg_verrevcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        let mut first_diff = 0;
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let ac = dpkg_order(a.get(i).copied());
            let bc = dpkg_order(b.get(j).copied());
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == 0 {
                first_diff = a[i] as i32 - b[j] as i32;
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != 0 {
            return first_diff.cmp(&0);
        }
    }
    Ordering::Equal
}

/// rpm's ordering of `[epoch:]version-release`.
pub fn rpm_cmp(a: &str, b: &str) -> Ordering {
    let (ea, ua, ra) = dpkg_split(a);
    let (eb, ub, rb) = dpkg_split(b);
    ea.cmp(&eb)
        .then_with(|| rpmvercmp(ua, ub))
        .then_with(|| rpmvercmp(ra, rb))
}

/// rpm's `rpmvercmp` (rpmio/rpmvercmp.c), including `~` and `^`.
pub fn rpmvercmp(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let sep = |c: u8| !c.is_ascii_alphanumeric() && c != b'~' && c != b'^';
    loop {
        while i < a.len() && sep(a[i]) {
            i += 1;
        }
        while j < b.len() && sep(b[j]) {
            j += 1;
        }
        // Tilde sorts before everything, even the end.
        let (at, bt) = (a.get(i) == Some(&b'~'), b.get(j) == Some(&b'~'));
        if at || bt {
            if !at {
                return Ordering::Greater;
            }
            if !bt {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        // Caret sorts after the end but before anything else.
        let (ac, bc) = (a.get(i) == Some(&b'^'), b.get(j) == Some(&b'^'));
        if ac || bc {
            if i >= a.len() {
                return Ordering::Less;
            }
            if j >= b.len() {
                return Ordering::Greater;
            }
            if !ac {
                return Ordering::Greater;
            }
            if !bc {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        if i >= a.len() || j >= b.len() {
            break;
        }
        let numeric = a[i].is_ascii_digit();
        let take = |s: &[u8], mut k: usize| {
            let start = k;
            while k < s.len()
                && (if numeric {
                    s[k].is_ascii_digit()
                } else {
                    s[k].is_ascii_alphabetic()
                })
            {
                k += 1;
            }
            (start, k)
        };
        let (s1, e1) = take(a, i);
        let (s2, e2) = take(b, j);
        if s2 == e2 {
            // Different segment types: numeric is newer.
            return if numeric {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let (mut x, mut y) = (&a[s1..e1], &b[s2..e2]);
        if numeric {
            while x.first() == Some(&b'0') {
                x = &x[1..];
            }
            while y.first() == Some(&b'0') {
                y = &y[1..];
            }
            match x.len().cmp(&y.len()) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        match x.cmp(y) {
            Ordering::Equal => {}
            o => return o,
        }
        i = e1;
        j = e2;
    }
    match (i >= a.len(), j >= b.len()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        _ => Ordering::Greater,
    }
}

/// The upstream version of a rollback on top of `current_upstream`: `X` -> `X+rb1`,
/// `X+rbN` -> `X+rb<N+1>`.
pub fn rollback_upstream(current_upstream: &str) -> String {
    if let Some((base, n)) = current_upstream.rsplit_once("+rb") {
        if let Ok(n) = n.parse::<u64>() {
            return format!("{base}+rb{}", n + 1);
        }
    }
    format!("{current_upstream}+rb1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn dpkg_order() {
        for (a, b, o) in [
            ("1.0-1", "1.0-1", Equal),
            ("1.0-1", "1.0-2", Less),
            ("1.0~rc1-1", "1.0-1", Less),
            ("1.0+rb1-1", "1.0-1", Greater),
            ("1.0+rb2-1", "1.0+rb1-1", Greater),
            ("1.0+rb10-1", "1.0+rb9-1", Greater),
            ("1:0.9-1", "1.0-1", Greater),
            ("1.10-1", "1.9-1", Greater),
            ("1.0a-1", "1.0-1", Greater),
        ] {
            assert_eq!(dpkg_cmp(a, b), o, "{a} vs {b}");
        }
    }

    #[test]
    fn rpm_order() {
        for (a, b, o) in [
            ("1.0-1", "1.0-1", Equal),
            ("1.0-1", "1.0-2", Less),
            ("1.0~rc1-1", "1.0-1", Less),
            ("1.0+rb1-1", "1.0-1", Greater),
            ("1.0+rb2-1", "1.0+rb1-1", Greater),
            ("1.0+rb10-1", "1.0+rb9-1", Greater),
            ("1.0^git1-1", "1.0-1", Greater),
            ("1.0^git1-1", "1.0.1-1", Less),
            ("1.10-1", "1.9-1", Greater),
            ("1.0a-1", "1.0-1", Greater),
        ] {
            assert_eq!(rpm_cmp(a, b), o, "{a} vs {b}");
        }
    }

    #[test]
    fn rollback_versions_climb() {
        assert_eq!(rollback_upstream("1.1.0"), "1.1.0+rb1");
        assert_eq!(rollback_upstream("1.1.0+rb1"), "1.1.0+rb2");
        assert_eq!(rollback_upstream("1.1.0+rb9"), "1.1.0+rb10");
    }
}
