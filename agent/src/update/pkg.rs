//! The host's package manager, driven through [`run`](super::run) so every command is bounded
//! by `package_timeout`: which system the host uses, what is installed (only fully installed
//! packages count), install/upgrade, remove, and the repair that runs before a pass when the
//! previous one failed or was interrupted (see [`PassMarker`]).
//!
//! Debian: `apt-get install ./file.deb` (dependencies resolved, conffiles kept with
//! `--force-confold`/`--force-confdef`), `dpkg --remove`, repair `dpkg --configure -a`.
//! RPM (with `--dbpath` when `rpm_dbpath` is set): `rpm -U --replacepkgs` (an upgrade erases
//! every older instance, so it also finishes a transaction that was killed between adding the
//! new header and erasing the old one), `rpm -e`, and repair = nothing to run: rpm's database
//! lock is an fcntl lock the kernel drops with the process, an interrupted transaction shows
//! up as two installed versions of a name, which [`PackageManager::installed_version`] reports
//! as not installed so the next plan reinstalls it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::plan::Format;
use super::run::{run, Outcome};
use crate::reaper::Spawned;

/// Which package system the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// dpkg (and apt-get when present).
    Dpkg,
    /// rpm.
    Rpm,
}

impl System {
    /// The package format this system installs.
    pub fn format(self) -> Format {
        match self {
            System::Dpkg => Format::Deb,
            System::Rpm => Format::Rpm,
        }
    }
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            System::Dpkg => "dpkg",
            System::Rpm => "rpm",
        })
    }
}

/// A package manager whose every run is bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct PackageManager {
    /// Which system.
    pub system: System,
    /// Bound of every command (`package_timeout`).
    pub timeout: Duration,
    /// Use apt-get for Debian installs (else plain `dpkg -i`).
    pub apt: bool,
    /// The agent's list of children it reaps itself (None outside the agent).
    pub spawned: Option<Spawned>,
    /// rpm's database, when not rpm's default (`rpm --dbpath`).
    pub rpm_dbpath: Option<PathBuf>,
}

/// dpkg options that never ask about conffiles: keep the admin's, take the default otherwise.
const DPKG_CONF: [&str; 2] = ["--force-confold", "--force-confdef"];

impl PackageManager {
    /// A manager for `system`; apt-get is used when it is installed.
    pub fn new(system: System, timeout: Duration) -> PackageManager {
        PackageManager {
            system,
            timeout,
            apt: Path::new("/usr/bin/apt-get").exists(),
            spawned: None,
            rpm_dbpath: None,
        }
    }

    /// `rpm [--dbpath DIR] ARGS`.
    fn rpm<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut v = vec!["rpm".to_string()];
        if let Some(db) = &self.rpm_dbpath {
            v.push("--dbpath".into());
            v.push(db.display().to_string());
        }
        v.extend(args.iter().map(|a| a.to_string()));
        v
    }

    async fn run_owned(&self, argv: Vec<String>) -> Outcome {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.run(&argv).await
    }

    async fn run(&self, argv: &[&str]) -> Outcome {
        run(argv, self.timeout, self.spawned.as_ref()).await
    }

    /// Runs a command that changes the system; none starts once the agent is stopping (a
    /// run in flight may finish, see `run::finish_before_exit`).
    async fn change(&self, argv: &[&str]) -> Outcome {
        if self.spawned.as_ref().is_some_and(Spawned::stopping) {
            return Outcome::Failed {
                code: None,
                output_tail: format!(
                    "{} not started: the agent is stopping (the next pass does it)",
                    argv.first().unwrap_or(&"package manager")
                ),
            };
        }
        self.run(argv).await
    }

    /// The command that installs or upgrades to the package file `file`.
    pub fn install_argv(&self, file: &Path) -> Vec<String> {
        let file = file.display().to_string();
        if self.system == System::Rpm {
            return self.rpm(&["-U", "--replacepkgs", &file]);
        }
        let v: Vec<&str> = match self.system {
            System::Dpkg if self.apt => vec![
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "-o",
                "Dpkg::Options::=--force-confold",
                "-o",
                "Dpkg::Options::=--force-confdef",
                "-o",
                "DPkg::Lock::Timeout=30",
                // No pty: with one, apt runs dpkg in a new session, out of the process group
                // that a timeout kills.
                "-o",
                "Dpkg::Use-Pty=0",
                &file,
            ],
            _ => [&["dpkg"], &DPKG_CONF[..], &["-i", &file]].concat(),
        };
        v.into_iter().map(String::from).collect()
    }

    /// Installs or upgrades from a package file (an absolute path: apt-get needs it).
    pub async fn install(&self, file: &Path) -> Outcome {
        let argv = self.install_argv(file);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.change(&argv).await
    }

    /// Removes a package (its conffiles stay, so lifting a quarantine restores the config).
    pub async fn remove(&self, name: &str) -> Outcome {
        match self.system {
            System::Dpkg => self.change(&["dpkg", "--remove", name]).await,
            System::Rpm => {
                let argv = self.rpm(&["-e", name]);
                let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                self.change(&argv).await
            }
        }
    }

    /// Finishes what an interrupted or failed pass left: `dpkg --configure -a` (configures
    /// unpacked packages; packages in "reinst-required" state are then left for the plan to
    /// reinstall, since they do not count as installed). Nothing for rpm (module doc).
    pub async fn repair(&self) -> Outcome {
        match self.system {
            System::Dpkg => {
                self.change(&["dpkg", DPKG_CONF[0], DPKG_CONF[1], "--configure", "-a"])
                    .await
            }
            System::Rpm => Outcome::Ok {
                output_tail: String::new(),
            },
        }
    }

    /// The installed version of `name`, only if it is fully installed: for dpkg the status
    /// must be `install ok installed` (not unpacked, half-configured, half-installed or
    /// config-files only); for rpm exactly one version must be registered. `Err` when the
    /// query itself failed (timeout, database unreadable).
    pub async fn installed_version(&self, name: &str) -> Result<Option<String>, String> {
        match self.system {
            System::Dpkg => {
                let o = self
                    .run(&["dpkg-query", "-W", "-f=${Status}\t${Version}\n", name])
                    .await;
                match o {
                    Outcome::Ok { output_tail } => Ok(parse_dpkg_query(&output_tail)),
                    // Exit 1: no such package known to dpkg.
                    Outcome::Failed { code: Some(1), .. } => Ok(None),
                    other => Err(format!(
                        "dpkg-query {name}: {other}: {}",
                        other.output_tail()
                    )),
                }
            }
            System::Rpm => {
                let o = self
                    .run_owned(self.rpm(&[
                        "-q",
                        "--qf",
                        "%|EPOCH?{%{EPOCH}:}:{}|%{VERSION}-%{RELEASE}\n",
                        name,
                    ]))
                    .await;
                match o {
                    Outcome::Ok { output_tail } => Ok(parse_rpm_query(&output_tail)),
                    Outcome::Failed {
                        code: Some(1),
                        output_tail,
                    } if output_tail.contains("is not installed") => Ok(None),
                    other => Err(format!("rpm -q {name}: {other}: {}", other.output_tail())),
                }
            }
        }
    }
}

/// `${Status}\t${Version}` lines -> the version if fully installed.
fn parse_dpkg_query(out: &str) -> Option<String> {
    let mut lines = out.lines().filter(|l| !l.trim().is_empty());
    let line = lines.next()?;
    if lines.next().is_some() {
        // Several architectures of one name: not something keepup installs; not ours.
        return None;
    }
    let (status, version) = line.split_once('\t')?;
    (status == "install ok installed" && !version.is_empty()).then(|| version.to_string())
}

/// One version per line -> the version if exactly one is registered.
fn parse_rpm_query(out: &str) -> Option<String> {
    let versions: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    match versions.as_slice() {
        [one] => Some(one.trim().to_string()),
        _ => None,
    }
}

/// The "pass in progress" marker: a plain text file `state_dir/update-in-progress` that says
/// what the pass was doing. Written before the first package command, removed when the pass
/// succeeds, rewritten with the reason when it fails. If it exists when a pass starts, the
/// previous pass failed or the agent died mid-install: repair first. Not a pidfile: nothing
/// reads a pid from it, and a stale one only costs one `dpkg --configure -a`.
#[derive(Debug, Clone)]
pub struct PassMarker {
    path: PathBuf,
}

impl PassMarker {
    /// The marker under `state_dir`.
    pub fn new(state_dir: &Path) -> PassMarker {
        PassMarker {
            path: state_dir.join("update-in-progress"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the previous pass left, if it did not finish cleanly.
    pub fn pending(&self) -> Option<String> {
        std::fs::read_to_string(&self.path).ok()
    }

    /// A pass starts doing `what` (one action per line).
    pub fn begin(&self, what: &[String]) -> std::io::Result<()> {
        let mut text = format!(
            "keepup-agent update pass started {} (if this file is still here, that pass did not \
             finish: the next pass repairs first)\n",
            crate::logfile::timestamp(std::time::SystemTime::now())
        );
        for w in what {
            text.push_str(&format!("  {w}\n"));
        }
        self.write(&text)
    }

    /// The pass failed: keep the marker, with why.
    pub fn failed(&self, why: &str) -> std::io::Result<()> {
        let mut text = self.pending().unwrap_or_default();
        text.push_str(&format!(
            "failed {}: {why}\n",
            crate::logfile::timestamp(std::time::SystemTime::now())
        ));
        self.write(&text)
    }

    /// The pass finished (or a repair succeeded): remove the marker.
    pub fn clear(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn write(&self, text: &str) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nothing_changes_once_the_agent_is_stopping() {
        let spawned = Spawned::default();
        let mut pm = PackageManager::new(System::Dpkg, Duration::from_secs(5));
        pm.spawned = Some(spawned.clone());
        spawned.stop_package_runs();
        for o in [
            pm.install(Path::new("/nonexistent/foo.deb")).await,
            pm.remove("foo").await,
            pm.repair().await,
        ] {
            assert!(
                o.output_tail()
                    .contains("not started: the agent is stopping"),
                "{o:?}"
            );
        }
        // Queries still run.
        assert!(pm.installed_version("keepup-no-such-package").await.is_ok());
    }

    #[test]
    fn only_fully_installed_counts() {
        assert_eq!(
            parse_dpkg_query("install ok installed\t1.2-1\n").as_deref(),
            Some("1.2-1")
        );
        for s in [
            "install ok unpacked\t1.2-1\n",
            "install ok half-configured\t1.2-1\n",
            "install reinstreq half-installed\t1.2-1\n",
            "deinstall ok config-files\t1.2-1\n",
            "unknown ok not-installed\t\n",
            "",
        ] {
            assert_eq!(parse_dpkg_query(s), None, "{s:?}");
        }
        assert_eq!(parse_rpm_query("1.2-1\n").as_deref(), Some("1.2-1"));
        assert_eq!(parse_rpm_query("1:1.2-1\n").as_deref(), Some("1:1.2-1"));
        assert_eq!(parse_rpm_query("1.1-1\n1.2-1\n"), None);
    }

    #[test]
    fn commands() {
        let mut m = PackageManager::new(System::Dpkg, Duration::from_secs(60));
        m.apt = true;
        let a = m.install_argv(Path::new("/var/cache/keepup/foo.deb"));
        assert_eq!(a[..2], ["apt-get", "install"]);
        assert!(a.contains(&"Dpkg::Options::=--force-confold".to_string()));
        assert_eq!(a.last().unwrap(), "/var/cache/keepup/foo.deb");
        m.apt = false;
        assert_eq!(
            m.install_argv(Path::new("/x.deb")),
            ["dpkg", "--force-confold", "--force-confdef", "-i", "/x.deb"]
        );
        let mut r = PackageManager::new(System::Rpm, Duration::from_secs(60));
        assert_eq!(
            r.install_argv(Path::new("/x.rpm")),
            ["rpm", "-U", "--replacepkgs", "/x.rpm"]
        );
        r.rpm_dbpath = Some("/var/lib/keepup-rpm".into());
        assert_eq!(
            r.install_argv(Path::new("/x.rpm")),
            [
                "rpm",
                "--dbpath",
                "/var/lib/keepup-rpm",
                "-U",
                "--replacepkgs",
                "/x.rpm"
            ]
        );
        assert_eq!(
            r.rpm(&["-e", "foo"]),
            ["rpm", "--dbpath", "/var/lib/keepup-rpm", "-e", "foo"]
        );
    }

    #[test]
    fn marker_lifecycle() {
        let d = tempfile::tempdir().unwrap();
        let m = PassMarker::new(&d.path().join("state"));
        assert_eq!(m.pending(), None);
        m.begin(&["install foo 1.0-1".into()]).unwrap();
        let t = m.pending().unwrap();
        assert!(
            t.contains("update pass started") && t.contains("  install foo 1.0-1\n"),
            "{t}"
        );
        m.failed("dpkg hung").unwrap();
        assert!(m.pending().unwrap().contains(": dpkg hung\n"));
        m.clear().unwrap();
        assert_eq!(m.pending(), None);
        m.clear().unwrap();
    }

    /// Real dpkg-query on this (Debian) machine; skipped where there is no dpkg.
    #[tokio::test]
    async fn real_dpkg_query() {
        if !Path::new("/var/lib/dpkg/status").exists() {
            return;
        }
        let m = PackageManager::new(System::Dpkg, Duration::from_secs(30));
        let v = m.installed_version("dpkg").await.unwrap();
        assert!(v.is_some_and(|v| v.starts_with('1')), "dpkg's own version");
        assert_eq!(
            m.installed_version("keepup-no-such-package").await,
            Ok(None)
        );
    }

    /// Real rpm on this machine (Debian's rpm): the default database, and one in a temporary
    /// directory (`rpm_dbpath`); only the not-installed path is checked.
    #[tokio::test]
    async fn real_rpm_query() {
        if !Path::new("/usr/bin/rpm").exists() {
            return;
        }
        let mut m = PackageManager::new(System::Rpm, Duration::from_secs(30));
        assert_eq!(
            m.installed_version("keepup-no-such-package").await,
            Ok(None)
        );
        // A database of its own (`rpm_dbpath`).
        let d = tempfile::tempdir().unwrap();
        m.rpm_dbpath = Some(d.path().to_path_buf());
        let o = m.run_owned(m.rpm(&["--initdb"])).await;
        assert!(o.is_ok(), "{o:?}");
        assert_eq!(
            m.installed_version("keepup-no-such-package").await,
            Ok(None)
        );
    }
}
