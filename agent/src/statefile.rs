//! Small JSON files in the agent's state directory (`serials.json`, `keys.json`, the events,
//! the host state) and its lock files. A [`StateFile`] is read whole,
//! and replaced by writing a temporary file, fsync'ing it and renaming it over the old one, so
//! a crash leaves the old file or the new one, never half of one.

use std::fs::File;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The file at `path`, holding a `T`.
#[derive(Debug, Clone)]
pub struct StateFile<T> {
    path: PathBuf,
    /// What removing the file forgets (said when it cannot be parsed).
    forgets: &'static str,
    _t: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned + Default> StateFile<T> {
    /// The file `name` in `state_dir`; `forgets` says what removing it loses.
    pub fn new(state_dir: &Path, name: &str, forgets: &'static str) -> StateFile<T> {
        StateFile {
            path: state_dir.join(name),
            forgets,
            _t: PhantomData,
        }
    }

    /// The value (the default if the file does not exist). An unreadable file is an error,
    /// never the default: starting from nothing may be unsafe (serials seen, keys learned).
    pub fn load(&self) -> Result<T, String> {
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                format!(
                    "{}: {e} (fix or remove it; removing it forgets {})",
                    self.path.display(),
                    self.forgets
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(format!("reading {}: {e}", self.path.display())),
        }
    }

    /// Writes `value` atomically.
    pub fn save(&self, value: &T) -> Result<(), String> {
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.path.with_extension("json.tmp");
            let mut text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
            text.push(b'\n');
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&text)?;
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
}

/// Writes `value` as JSON to `file` through a temporary file and a rename.
pub fn save_json(file: &Path, value: &impl serde::Serialize) -> std::io::Result<()> {
    let tmp = file.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(value)?)?;
    std::fs::rename(&tmp, file)
}

/// Opens (creating, mode 0600) a lock file, refusing to follow a symlink planted in its place.
pub fn open_lock_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}
