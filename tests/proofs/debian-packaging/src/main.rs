//! Builds hello_1.0-1_amd64.deb with debian-packaging 0.18's `DebBuilder`:
//! one file, /usr/bin/hello, and ordinary control fields. run.sh then checks
//! the output with dpkg-deb, dpkg and lintian.

use std::borrow::Cow;
use std::time::{Duration, UNIX_EPOCH};

use debian_packaging::control::{ControlFile, ControlParagraph};
use debian_packaging::deb::builder::DebBuilder;
use debian_packaging::deb::DebCompression;
use simple_file_manifest::FileEntry;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "hello_1.0-1_amd64.deb".to_string());

    let mut para = ControlParagraph::default();
    for (k, v) in [
        ("Package", "hello"),
        ("Version", "1.0-1"),
        ("Architecture", "amd64"),
        ("Maintainer", "keepup proofs <proofs@example.invalid>"),
        ("Section", "utils"),
        ("Priority", "optional"),
        ("Installed-Size", "1"),
        ("Description", "says hello\n a proof that the md5sums member is checked"),
    ] {
        para.set_field_from_string(Cow::Borrowed(k), Cow::Borrowed(v));
    }
    let mut control = ControlFile::default();
    control.add_paragraph(para);

    let script = b"#!/bin/sh\necho hello\n".to_vec();
    let deb = DebBuilder::new(control)
        .set_compression(DebCompression::Gzip)
        .set_mtime(Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)))
        .install_file("usr/bin/hello", FileEntry::new_from_data(script, true))?;

    let mut file = std::fs::File::create(&out)?;
    deb.write(&mut file)?;
    println!("wrote {out}");
    Ok(())
}
