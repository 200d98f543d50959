//! TLS for the QUIC link: the cloud's self-signed certificate (generated once, kept in its state
//! directory, identified by its SHA-256 fingerprint) and the edge's two ways to trust it: pin the
//! fingerprint, or trust the certificate file.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::util::digest::sha256;
use crate::error::{Error, Result};

/// The name the certificate is issued to and the edge asks for.
pub const SERVER_NAME: &str = "hat-cloud";
const CERT_FILE: &str = "cert.der";
const KEY_FILE: &str = "key.der";

/// A certificate and its private key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// `sha256:<64 hex digits>` of the certificate (DER).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }
}

/// `sha256:<64 hex digits>` of a DER certificate.
pub fn fingerprint(cert: &[u8]) -> String {
    format!("sha256:{}", sha256(cert))
}

/// Loads the identity kept in `state_dir`, or creates and keeps a new self-signed one.
pub fn load_or_create_identity(state_dir: &Path) -> Result<Identity> {
    let (cert_path, key_path) = (state_dir.join(CERT_FILE), state_dir.join(KEY_FILE));
    if cert_path.exists() && key_path.exists() {
        let cert = std::fs::read(&cert_path).map_err(|e| Error::io(&cert_path, e))?;
        let key = std::fs::read(&key_path).map_err(|e| Error::io(&key_path, e))?;
        return Ok(Identity { cert: CertificateDer::from(cert), key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)) });
    }
    std::fs::create_dir_all(state_dir).map_err(|e| Error::io(state_dir, e))?;
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string(), "localhost".to_string()])
        .map_err(|e| Error::invalid(format!("cannot generate a certificate: {e}")))?;
    let cert = certified.cert.der().to_vec();
    let key = certified.key_pair.serialize_der();
    // Key first, written private; the pair counts as present only once both exist.
    write_private(&key_path, &key)?;
    std::fs::write(&cert_path, &cert).map_err(|e| Error::io(&cert_path, e))?;
    Ok(Identity { cert: CertificateDer::from(cert), key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)) })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))
}

/// How the edge decides to trust the cloud.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Accept exactly the certificate with this fingerprint (`sha256:<hex>`).
    Fingerprint(String),
    /// Trust this certificate file (DER or PEM) as a root; the name must match.
    CertFile(std::path::PathBuf),
}

/// Parses and normalises a `sha256:<64 hex>` fingerprint.
pub fn parse_fingerprint(s: &str) -> Result<String> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase().replace(':', "");
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(Error::invalid(format!("--cloud-fingerprint '{s}': expected sha256:<64 hex digits>")));
    }
    Ok(format!("sha256:{hex}"))
}

/// Accepts only the pinned certificate (signatures still verified with the certificate's key).
#[derive(Debug)]
struct PinnedCert {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the cloud's certificate fingerprint is {got}, not the pinned {}",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// rustls server config for the cloud: TLS 1.3, ALPN `hat/1`.
pub fn server_config(id: &Identity) -> Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::invalid(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| Error::invalid(format!("TLS certificate: {e}")))?;
    cfg.alpn_protocols = vec![crate::net::protocol::ALPN.to_vec()];
    Ok(cfg)
}

/// Reads a certificate file, DER or PEM.
fn read_cert(path: &Path) -> Result<CertificateDer<'static>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.starts_with(b"-----BEGIN") {
        let text = String::from_utf8_lossy(&bytes);
        let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64_decode(&b64).ok_or_else(|| Error::bad_file(path, "invalid PEM certificate"))?;
        return Ok(CertificateDer::from(der));
    }
    Ok(CertificateDer::from(bytes))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// rustls client config for the edge.
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::invalid(format!("TLS: {e}")))?;
    let mut cfg = match trust {
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert { fingerprint: parse_fingerprint(fp)?, provider: provider() }))
            .with_no_client_auth(),
        Trust::CertFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(read_cert(path)?).map_err(|e| Error::bad_file(path, format!("not a usable certificate: {e}")))?;
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![crate::net::protocol::ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_and_fingerprints_parse() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_identity(dir.path()).unwrap();
        let b = load_or_create_identity(dir.path()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.fingerprint().starts_with("sha256:") && a.fingerprint().len() == 7 + 64);
        assert_eq!(parse_fingerprint(&a.fingerprint().to_uppercase().replace("SHA256:", "sha256:")).unwrap(), a.fingerprint());
        assert!(parse_fingerprint("sha256:abc").is_err());
        assert_eq!(base64_decode("aGF0").unwrap(), b"hat");
        assert_eq!(base64_decode("aGF0cw==").unwrap(), b"hats");
    }
}
