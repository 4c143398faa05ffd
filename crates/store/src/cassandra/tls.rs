//! The rustls client configuration of `cassandra://…?tls=true`: which certificate
//! authorities are trusted (`tls_ca`, else the system's), whether the node's certificate must
//! name the address connected to (`tls_verify_hostname`), on the aws-lc-rs crypto provider.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::url::CassandraUrl;
use crate::error::{Result, StoreError};

/// Builds the TLS client configuration the driver uses for every connection.
///
/// The crypto provider is aws-lc-rs, installed on this configuration only (not as the
/// process default), so the choice does not depend on which rustls features other crates of
/// the program enabled.
pub(crate) fn client_config(url: &CassandraUrl, redacted: &str) -> Result<Arc<ClientConfig>> {
    let bad = |reason: String| StoreError::InvalidUrl {
        url: redacted.to_owned(),
        reason,
    };
    let roots = match &url.tls_ca {
        Some(path) => roots_from_file(path).map_err(bad)?,
        None => system_roots().map_err(bad)?,
    };
    build(roots, url.tls_verify_hostname)
        .map_err(|e| bad(format!("tls: cannot build the TLS configuration: {e}")))
}

/// The client configuration trusting `roots`, checking the node's name or not.
fn build(
    roots: RootCertStore,
    verify_hostname: bool,
) -> std::result::Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots = Arc::new(roots);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if verify_hostname {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| e.to_string())?;
        builder.with_webpki_verifier(verifier).with_no_client_auth()
    } else {
        let verifier = ChainOnly::new(roots, provider)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The certificates of a PEM file, as trust anchors. Messages name the file.
fn roots_from_file(path: &str) -> std::result::Result<RootCertStore, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("tls_ca: cannot read the CA file {path:?}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("tls_ca: the CA file {path:?} is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "tls_ca: the CA file {path:?} holds no PEM certificate \
             (expected -----BEGIN CERTIFICATE----- blocks)"
        ));
    }
    let mut roots = RootCertStore::empty();
    for (index, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| {
            format!(
                "tls_ca: certificate #{} of the CA file {path:?} is not a usable CA \
                 certificate: {e}",
                index + 1
            )
        })?;
    }
    Ok(roots)
}

/// The operating system's trusted certificate authorities, for `tls=true` without `tls_ca`.
fn system_roots() -> std::result::Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(format!(
            "tls: no tls_ca given and the system's CA certificates cannot be loaded ({why}); \
             add tls_ca=/path/to/ca.pem"
        ));
    }
    Ok(roots)
}

/// `tls_verify_hostname=false`: the node's certificate must still chain to a trusted CA and
/// be valid now, and the handshake must be signed by its key, but it may name another host.
struct ChainOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    /// Checks the handshake signatures exactly as the default verifier does.
    signatures: Arc<WebPkiServerVerifier>,
}

impl ChainOnly {
    fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> std::result::Result<Self, String> {
        let signatures =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        Ok(ChainOnly {
            roots,
            provider,
            signatures,
        })
    }
}

impl fmt::Debug for ChainOnly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainOnly")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use rustls::pki_types::PrivateKeyDer;
    use rustls::{ClientConnection, ServerConfig, ServerConnection};

    use super::*;
    use crate::cassandra::url;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls");

    fn fixture(name: &str) -> String {
        format!("{FIXTURES}/{name}")
    }

    fn config(query: &str) -> Result<Arc<ClientConfig>> {
        let text = format!("cassandra://127.0.0.1/ks?{query}");
        client_config(&url::parse(&text).expect("valid URL"), &text)
    }

    /// Runs a TLS handshake in memory between `client` (connecting to 127.0.0.1, as the
    /// driver does: it names nodes by IP address) and a server presenting `elsewhere.pem`,
    /// a certificate for `DNS:elsewhere.invalid` signed by the fixture `ca.pem`.
    fn handshake(client: Arc<ClientConfig>) -> std::result::Result<(), rustls::Error> {
        let pem = std::fs::read(fixture("elsewhere.pem")).expect("fixture");
        let chain = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .expect("certificate PEM");
        let key = PrivateKeyDer::from_pem_file(fixture("elsewhere.key")).expect("key PEM");
        let server = ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
        let mut server = ServerConnection::new(Arc::new(server)).expect("server");
        let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
        let mut client = ClientConnection::new(client, name).expect("client");
        // A TLS 1.3 handshake needs two flights each way; ten rounds is plenty.
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
            let mut wire = Vec::new();
            client.write_tls(&mut wire).expect("client writes");
            server.read_tls(&mut wire.as_slice()).expect("server reads");
            server.process_new_packets()?;
            wire.clear();
            server.write_tls(&mut wire).expect("server writes");
            client.read_tls(&mut wire.as_slice()).expect("client reads");
            client.process_new_packets()?;
        }
        panic!("the handshake did not finish in ten rounds");
    }

    #[test]
    fn the_default_verifier_checks_the_name() {
        let client = config(&format!("tls_ca={}", fixture("ca.pem"))).expect("config");
        let err = handshake(client).expect_err("the certificate names elsewhere.invalid");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn without_hostname_verification_the_chain_is_still_checked() {
        let ca = fixture("ca.pem");
        let client = config(&format!("tls_ca={ca}&tls_verify_hostname=false")).expect("config");
        handshake(client).expect("chain to the trusted CA, name ignored");

        let other = fixture("other-ca.pem");
        let client = config(&format!("tls_ca={other}&tls_verify_hostname=false")).expect("config");
        let err = handshake(client).expect_err("signed by a CA that is not trusted");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
    }

    #[test]
    fn ca_file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::write(path("text.pem"), "not a certificate\n").expect("write");
        std::fs::write(
            path("unterminated.pem"),
            "-----BEGIN CERTIFICATE-----\nMIIB\n",
        )
        .expect("write");
        let key = std::fs::read(fixture("elsewhere.key")).expect("fixture");
        std::fs::write(path("key.pem"), key).expect("write");
        std::fs::write(
            path("garbage.pem"),
            "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        for (file, needle) in [
            (path("missing.pem"), "cannot read the CA file"),
            (dir.path().display().to_string(), "cannot read the CA file"),
            (path("text.pem"), "holds no PEM certificate"),
            (path("key.pem"), "holds no PEM certificate"),
            (path("unterminated.pem"), "is not valid PEM"),
            (path("garbage.pem"), "certificate #1 of the CA file"),
        ] {
            let err = config(&format!("tls_ca={file}")).expect_err(&file);
            assert!(matches!(err, StoreError::InvalidUrl { .. }), "{err}");
            let text = err.to_string();
            assert!(
                text.contains(needle) && text.contains(&format!("{file:?}")),
                "{file}: {text}"
            );
        }
    }

    #[test]
    fn a_ca_file_with_several_certificates_trusts_them_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bundle.pem");
        let mut pem = std::fs::read(fixture("other-ca.pem")).expect("fixture");
        pem.extend(std::fs::read(fixture("ca.pem")).expect("fixture"));
        std::fs::write(&bundle, pem).expect("write");
        let client = config(&format!(
            "tls_ca={}&tls_verify_hostname=false",
            bundle.display()
        ))
        .expect("config");
        handshake(client).expect("the second certificate of the bundle is trusted");
    }
}
