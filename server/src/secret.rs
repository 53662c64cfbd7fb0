//! The token secrets: the configured ones, or one generated on the server's first start and
//! kept in the data directory (owner-only) so tokens survive restarts and `keyserver token`
//! beside the server works with no setup. Only `serve` creates a secret: `keyserver token`
//! run anywhere else would otherwise sign with a secret no server knows.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

use crate::auth::{MIN_SECRET_LEN, TokenAuthority};
use crate::config::{DataDirArgs, SecretArgs};

/// File name of the generated secret inside the data directory.
pub const SECRET_FILE: &str = "token-secret";

/// Whether a missing secret file may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// `serve`: the embedded default generates its secret on first start.
    Create,
    /// Anything that mints tokens for a server: a new secret would fit no server.
    Refuse,
}

/// The token authority of `args`: the signing secret (configured, or the data directory's)
/// and the further verification secrets.
pub fn authority(
    args: &SecretArgs,
    data: &DataDirArgs,
    missing: Missing,
) -> anyhow::Result<TokenAuthority> {
    let mut secrets = vec![signing_secret(args.token_secret.as_deref(), data, missing)?];
    for (i, extra) in args.token_verify_secrets.iter().enumerate() {
        anyhow::ensure!(
            extra.len() >= MIN_SECRET_LEN,
            "KEYSERVER_TOKEN_VERIFY_SECRETS: secret {} is shorter than {MIN_SECRET_LEN} bytes",
            i + 1
        );
        secrets.push(extra.as_bytes().to_vec());
    }
    TokenAuthority::new(&secrets, args.policy())
}

/// The configured secret if there is one, otherwise the data directory's.
fn signing_secret(
    configured: Option<&str>,
    data: &DataDirArgs,
    missing: Missing,
) -> anyhow::Result<Vec<u8>> {
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match missing {
            Missing::Create => create(data, &path),
            Missing::Refuse => anyhow::bail!(
                "no token secret: KEYSERVER_TOKEN_SECRET is unset and {} does not exist. Run \
                 this where the server keeps its data (--data-dir or KEYSERVER_DATA_DIR), or \
                 set KEYSERVER_TOKEN_SECRET to the server's secret",
                path.canonicalize()
                    .unwrap_or_else(|_| std::env::current_dir()
                        .map(|d| d.join(&path))
                        .unwrap_or(path.clone()))
                    .display()
            ),
        },
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
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            signing_secret(None, data, Missing::Refuse)
        }
        Err(e) => Err(e).with_context(|| format!("writing {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_serve_generates_it_once_kept_private_and_configured_wins() {
        let dir = std::env::temp_dir().join(format!("ks-secret-{}", uuid::Uuid::new_v4()));
        let data = DataDirArgs {
            data_dir: dir.clone(),
        };
        let refused = signing_secret(None, &data, Missing::Refuse).unwrap_err();
        assert!(refused.to_string().contains("token-secret"), "{refused}");
        assert!(!dir.exists(), "refusing created the data directory");
        let first = signing_secret(None, &data, Missing::Create).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(signing_secret(None, &data, Missing::Refuse).unwrap(), first);
        let mode = fs::metadata(dir.join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let configured = "x".repeat(40);
        assert_eq!(
            signing_secret(Some(&configured), &data, Missing::Refuse).unwrap(),
            configured.as_bytes()
        );
        assert!(signing_secret(Some("short"), &data, Missing::Refuse).is_err());

        fs::set_permissions(dir.join(SECRET_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(signing_secret(None, &data, Missing::Create).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
