//! `keepup host add|list|remove --state FILE|URL`: who may report. A host's token is printed
//! once, when issued; the database keeps only its SHA-256. A running server picks up the
//! change within seconds.

use std::io::{BufRead as _, Write as _};

use anyhow::{bail, Result};
use keepup_deploy::wire::names::{is_host_name, HOST_NAME_RULE};

use super::db::{now, Db, Location};
use super::view::age;

fn check_name(name: &str) -> Result<()> {
    if !is_host_name(name) {
        bail!("{name:?} is not a host name ({HOST_NAME_RULE})");
    }
    Ok(())
}

/// `keepup host add NAME`: print only the token on stdout (a note on stderr). With `bulk`,
/// read names from stdin, one per line, and print `NAME TOKEN` lines.
pub fn add(state: &Location, name: Option<&str>, bulk: bool) -> Result<()> {
    let names: Vec<String> = if bulk {
        let mut v = Vec::new();
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            let n = line.trim();
            if !n.is_empty() {
                check_name(n)?;
                v.push(n.to_string());
            }
        }
        v
    } else {
        match name {
            Some(n) => {
                check_name(n)?;
                vec![n.to_string()]
            }
            None => bail!("name the host: keepup host add NAME (or --bulk with names on stdin)"),
        }
    };
    let mut db = Db::open(state)?;
    let added = db.add_hosts(&names)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if bulk {
        let replaced = added.iter().filter(|a| a.2).count();
        for (n, t, _) in &added {
            writeln!(out, "{n} {t}")?;
        }
        out.flush()?;
        eprintln!(
            "keepup: {} host(s) registered ({replaced} had a token, now replaced); \
             each agent needs its own token",
            added.len()
        );
    } else {
        let (n, t, replaced) = &added[0];
        writeln!(out, "{t}")?;
        out.flush()?;
        if *replaced {
            eprintln!("keepup: host {n} had a token; it is replaced by this one (the old one no longer works)");
        } else {
            eprintln!(
                "keepup: host {n} registered; give this token to its agent (it is not shown again)"
            );
        }
    }
    Ok(())
}

/// `keepup host list`.
pub fn list(state: &Location) -> Result<()> {
    let db = Db::open(state)?;
    let t = now();
    println!("HOST  ADDED  LAST-REPORT");
    for h in db.hosts()? {
        println!(
            "{}  {} ago  {}",
            h.name,
            age(t, Some(h.added_at)),
            match h.last_report {
                Some(r) => format!("{} ago", age(t, Some(r))),
                None => "never".into(),
            }
        );
    }
    Ok(())
}

/// `keepup host remove NAME`: its token stops working; its report and events are deleted.
pub fn remove(state: &Location, name: &str) -> Result<()> {
    let mut db = Db::open(state)?;
    if !db.remove_host(name)? {
        bail!("no host {name:?} in {state}; see `keepup host list`");
    }
    eprintln!("keepup: host {name} removed; its token no longer works");
    Ok(())
}
