//! TLS for the gRPC listener (rustls with ring): the certificate and key from PEM files,
//! optionally client certificates checked against a CA (mTLS between a chat backend and the
//! key server), and reload without a restart.
//!
//! Each new connection's handshake uses the configuration current at that moment; a reload
//! (SIGHUP, or a change of any of the files, looked at every few seconds) swaps it, so
//! connections already open keep theirs and nothing is dropped. A reload that fails (a half
//! written file, a key that does not match) keeps the old configuration and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::metrics as m;
use crate::shutdown::CancellationToken;

/// How often the files are looked at for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// The PEM files TLS is configured from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate issued by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// When each file last changed, to notice a new certificate.
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// The provider every configuration uses: ring, chosen explicitly so that no process-wide
/// default has to be installed.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server configuration the files describe.
pub fn load(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("reading the certificate {}", files.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing the certificate {}", files.cert.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{} holds no PEM certificate",
        files.cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("reading the private key {}", files.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading the client CA {}", path.display()))?
            {
                roots
                    .add(cert.with_context(|| format!("parsing {}", path.display()))?)
                    .with_context(|| format!("a CA certificate in {}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .with_context(|| format!("the client CA {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the certificate and the private key do not go together")?;
    // gRPC is HTTP/2 only; clients that offer ALPN expect it named.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The current TLS configuration, replaced on reload.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<TlsAcceptor>>,
    files: TlsFiles,
}

impl Tls {
    /// Loads the files; fails when they do not make a configuration.
    pub fn new(files: TlsFiles) -> anyhow::Result<Self> {
        let acceptor = TlsAcceptor::from(Arc::new(load(&files)?));
        Ok(Self {
            current: Arc::new(RwLock::new(acceptor)),
            files,
        })
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Loads the files again and, if they make a configuration, uses it from now on.
    pub fn reload(&self, why: &'static str) {
        match load(&self.files) {
            Ok(config) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                    TlsAcceptor::from(Arc::new(config));
                metrics::counter!(m::TLS_RELOADS, "outcome" => "loaded").increment(1);
                tracing::info!(trigger = why, cert = %self.files.cert.display(), "reloaded the TLS certificate");
            }
            Err(e) => {
                metrics::counter!(m::TLS_RELOADS, "outcome" => "failed").increment(1);
                tracing::error!(
                    trigger = why,
                    error = format!("{e:#}"),
                    "reloading the TLS certificate failed; keeping the one in use"
                );
            }
        }
    }

    /// Reloads on SIGHUP and whenever one of the files changes, until `shutdown`.
    pub fn watch(&self, shutdown: CancellationToken) -> anyhow::Result<JoinHandle<()>> {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let tls = self.clone();
        Ok(tokio::spawn(async move {
            let mut seen = tls.files.stamps();
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = hangup.recv() => tls.reload("SIGHUP"),
                    _ = tick.tick() => {
                        let now = tls.files.stamps();
                        if now != seen {
                            seen = now;
                            tls.reload("file change");
                        }
                    }
                }
            }
        }))
    }
}

/// Writes a self-signed certificate for `names` (host names or IP addresses) and its private
/// key (owner-only), for trying TLS without a CA.
pub fn write_self_signed(names: &[String], cert: &Path, key: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let made = rcgen::generate_simple_self_signed(names.to_vec())
        .context("making a self-signed certificate")?;
    std::fs::write(cert, made.cert.pem()).with_context(|| format!("writing {}", cert.display()))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key)
        .and_then(|mut f| f.write_all(made.signing_key.serialize_pem().as_bytes()))
        .with_context(|| format!("writing {}", key.display()))?;
    Ok(())
}
