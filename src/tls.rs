//! TLS for the listeners (rustls, TLS 1.2 and 1.3 only): the certificate and
//! key come from PEM files and are read again when the files change, so a
//! renewed certificate is served to the next connection while connected
//! agents stay connected. With a client CA, every client must present a
//! certificate that CA signed (mTLS), and its subject becomes the
//! connection's identity.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Where the PEM files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no {what} in it (expected PEM)", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// A TLS client that trusts the certificates in `roots` (PEM) alone, or
/// without it the system's: how a replica reaches PostgreSQL and the other
/// replicas' APIs.
pub fn client_trusting(roots: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    match roots {
        Some(path) => {
            for cert in certificates(path)? {
                store.add(cert).map_err(|e| TlsError::Invalid {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            }
        }
        None => {
            let (_, unreadable) = store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if unreadable > 0 {
                tracing::debug!(unreadable, "some of the system's certificates cannot be used");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports rustls' default protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(config)
}

/// The certificate chain and key of `files`, checked to belong together.
fn certified_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(&files.cert)?;
    let pem = std::fs::read(&files.key).map_err(|source| TlsError::Read {
        path: files.key.clone(),
        source,
    })?;
    let invalid = |message: String| TlsError::Invalid {
        path: files.key.clone(),
        message,
    };
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| invalid(e.to_string()))?;
    let key = any_supported_type(&key).map_err(|e| invalid(e.to_string()))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| TlsError::Invalid {
        path: files.cert.clone(),
        message: format!("the certificate does not belong to {}: {e}", files.key.display()),
    })?;
    Ok(certified)
}

/// Serves the newest certificate read.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().expect("certificate lock").clone())
    }
}

/// The listeners' TLS: one certificate, read again by [`ServerTls::reload`],
/// served by two acceptors — agents', which asks for a client certificate
/// when there is a client CA, and operators', which never does.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    current: Arc<Current>,
    agents: TlsAcceptor,
    operators: TlsAcceptor,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let current = Arc::new(Current(RwLock::new(Arc::new(certified_key(&files)?))));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = || {
            ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| TlsError::Invalid {
                    path: files.cert.clone(),
                    message: e.to_string(),
                })
        };
        let acceptor = |mut config: ServerConfig| {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            TlsAcceptor::from(Arc::new(config))
        };
        let agents = match &files.client_ca {
            None => builder()?.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(ca)? {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        path: ca.clone(),
                        message: e.to_string(),
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsError::Invalid {
                        path: ca.clone(),
                        message: e.to_string(),
                    })?;
                builder()?.with_client_cert_verifier(verifier)
            }
        };
        let agents = acceptor(agents.with_cert_resolver(current.clone()));
        let operators = acceptor(builder()?.with_no_client_auth().with_cert_resolver(current.clone()));
        Ok(ServerTls {
            files,
            current,
            agents,
            operators,
        })
    }

    /// For the OpAMP listener.
    pub fn agents(&self) -> &TlsAcceptor {
        &self.agents
    }

    /// For the API listener.
    pub fn operators(&self) -> &TlsAcceptor {
        &self.operators
    }

    /// Reads the certificate and key again; on an error the one in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = certified_key(&self.files)?;
        *self.current.0.write().expect("certificate lock") = Arc::new(fresh);
        Ok(())
    }

    /// Reloads whenever the certificate or key file changes, until the
    /// returned watcher is dropped.
    pub fn watch(&self) -> notify::Result<notify::RecommendedWatcher> {
        let tls = self.clone();
        watch_files(&[self.files.cert.clone(), self.files.key.clone()], move || {
            match tls.reload() {
                Ok(()) => tracing::info!(cert = %tls.files.cert.display(), "TLS certificate reloaded"),
                // A pair mid-replacement (new certificate, old key) settles with
                // the next event; until then the old pair serves.
                Err(e) => tracing::warn!(error = %e, "TLS certificate not reloaded; the previous one stays"),
            }
        })
    }
}

/// Calls `changed` whenever one of `files` changes, until the returned
/// watcher is dropped. Editors and certificate tools replace files (write,
/// then rename), so the folders are watched, not the files.
pub fn watch_files(
    files: &[PathBuf],
    changed: impl Fn() + Send + 'static,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let names = files.to_vec();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && changes(&event, &names)
        {
            changed();
        }
    })?;
    for file in files {
        let folder = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        watcher.watch(folder, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}

fn same_file_name(a: &Path, b: &Path) -> bool {
    a.file_name().is_some() && a.file_name() == b.file_name()
}

/// Whether `event` may have changed one of `files`. Reading a file (opening,
/// closing it unwritten) changes nothing: were it taken for a change, two
/// processes watching the same files would reload each other without end, as
/// each reload reads them.
fn changes(event: &notify::Event, files: &[PathBuf]) -> bool {
    let read = matches!(
        event.kind,
        notify::EventKind::Access(
            notify::event::AccessKind::Open(_)
                | notify::event::AccessKind::Read
                | notify::event::AccessKind::Close(notify::event::AccessMode::Read | notify::event::AccessMode::Any)
        )
    );
    !read && event.paths.iter().any(|p| files.iter().any(|n| same_file_name(p, n)))
}

/// The identity a client certificate carries: its subject's common name,
/// else the whole subject.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject();
    let cn = subject.iter_common_name().next().and_then(|cn| cn.as_str().ok());
    Some(cn.map_or_else(|| subject.to_string(), str::to_string))
}

#[cfg(test)]
mod tests {
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind};

    use super::*;

    #[test]
    fn reading_a_watched_file_is_no_change_writing_or_replacing_it_is() {
        let files = [
            PathBuf::from("/etc/tls/server.pem"),
            PathBuf::from("/etc/tls/server.key"),
        ];
        let event = |kind, path: &str| notify::Event::new(kind).add_path(PathBuf::from(path));
        for read in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(!changes(&event(read, "/etc/tls/server.key"), &files), "{read:?}");
        }
        for change in [
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Create(CreateKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ] {
            assert!(changes(&event(change, "/etc/tls/server.pem"), &files), "{change:?}");
            assert!(
                !changes(&event(change, "/etc/tls/other.pem"), &files),
                "another file: {change:?}"
            );
        }
    }
}
