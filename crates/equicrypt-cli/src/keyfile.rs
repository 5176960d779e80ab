//! Key files on disk: created 0600 and never overwritten; contents zeroized after parsing.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use equicrypt_core::SecretKey;
use zeroize::Zeroizing;

/// Writes a fresh key to `path` (mode 0600), refusing to overwrite an existing file.
pub fn write_new(path: &Path, key: &SecretKey) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = match opts.open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "{} already exists (refusing to overwrite a key)",
                path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
    };
    let text = key.to_file_text();
    let written = f.write_all(text.as_bytes()).and_then(|_| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Reads a key file.
pub fn read(path: &Path) -> Result<SecretKey> {
    let bytes = Zeroizing::new(
        std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?,
    );
    let text = std::str::from_utf8(&bytes)
        .with_context(|| format!("{}: key file is not text", path.display()))?;
    let key = SecretKey::from_file_text(text).with_context(|| path.display().to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "warning: key file {} is readable by other users (chmod 600 it)",
                    path.display()
                );
            }
        }
    }
    Ok(key)
}
