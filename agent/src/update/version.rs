//! Version ordering as dpkg and rpm define it, shared with the repository (see
//! `keepup_packager::version`), so the updater never downgrades.

pub use keepup_packager::version::{dpkg_cmp, rpm_cmp};
