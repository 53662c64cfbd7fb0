//! The token-signing secret: the configured one, or one generated on first start and kept in
//! the data directory (owner-only) so tokens survive restarts and `keyserver token` works with
//! no setup.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

use crate::auth::MIN_SECRET_LEN;
use crate::config::DataDirArgs;

/// File name of the generated secret inside the data directory.
pub const SECRET_FILE: &str = "token-secret";

/// The configured secret if there is one, otherwise the data directory's (created if absent).
pub fn load_or_create(configured: Option<&str>, data: &DataDirArgs) -> anyhow::Result<Vec<u8>> {
    if let Some(secret) = configured {
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_LEN,
            "KEYSERVER_TOKEN_SECRET must be at least {MIN_SECRET_LEN} bytes"
        );
        return Ok(secret.as_bytes().to_vec());
    }
    let path = data.data_dir.join(SECRET_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path)?.permissions().mode();
            anyhow::ensure!(
                mode & 0o077 == 0,
                "{} is readable by other users (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            );
            let secret = text.trim().as_bytes().to_vec();
            anyhow::ensure!(
                secret.len() >= MIN_SECRET_LEN,
                "{} holds fewer than {MIN_SECRET_LEN} bytes",
                path.display()
            );
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(data, &path),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn create(data: &DataDirArgs, path: &Path) -> anyhow::Result<Vec<u8>> {
    data.ensure()?;
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let secret = hex::encode(raw);
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(secret.as_bytes())?;
            file.sync_all()?;
            tracing::info!(path = %path.display(), "generated a new token-signing secret");
            Ok(secret.into_bytes())
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create(None, data),
        Err(e) => Err(e).with_context(|| format!("writing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_keeps_it_private_and_configured_wins() {
        let dir = std::env::temp_dir().join(format!("ks-secret-{}", uuid::Uuid::new_v4()));
        let data = DataDirArgs {
            data_dir: dir.clone(),
        };
        let first = load_or_create(None, &data).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create(None, &data).unwrap(), first);
        let mode = fs::metadata(dir.join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let configured = "x".repeat(40);
        assert_eq!(
            load_or_create(Some(&configured), &data).unwrap(),
            configured.as_bytes()
        );
        assert!(load_or_create(Some("short"), &data).is_err());

        fs::set_permissions(dir.join(SECRET_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_or_create(None, &data).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
