//! TLS for the server's listeners (TCP and WebSocket), with rustls.
//!
//! Configs are built with an explicit crypto provider (ring): rustls cannot choose a default
//! when more than one provider is linked into the program. Client certificates are optional;
//! when a client CA is given, every client must present a certificate it signed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::WebPkiClientVerifier;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM input holds no certificate.
    #[error("no certificate found in the {what} PEM")]
    NoCertificate {
        /// Which input.
        what: &'static str,
    },
    /// A PEM input could not be parsed.
    #[error("cannot read the {what} PEM: {message}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// The parser's message.
        message: String,
    },
    /// rustls refused the configuration (a key that does not match the certificate, …).
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not be used to verify clients.
    #[error("invalid client CA: {0}")]
    ClientCa(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what, message: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// A server TLS configuration from PEM: the certificate chain, its private key, and optionally
/// the CA whose certificates clients must present.
///
/// # Errors
/// [`TlsError`] for unreadable PEM, a key that does not fit, or an unusable client CA.
pub fn server_tls(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = certificates(cert_chain_pem, "certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Pem { what: "private key", message: e.to_string() })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca_pem {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca, "client CA")? {
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

/// Runs the TLS handshake on an accepted connection, within `limit`; `None` (logged) if it fails.
pub(super) async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    config: &Arc<rustls::ServerConfig>,
    stream: S,
    peer: SocketAddr,
    limit: Duration,
) -> Option<TlsStream<S>> {
    let handshake = TlsAcceptor::from(Arc::clone(config)).accept(stream);
    match tokio::time::timeout(limit, handshake).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}
