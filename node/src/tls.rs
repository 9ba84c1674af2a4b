//! TLS of the gRPC links between nodes (and the CLI) and the hub: rustls
//! with the ring provider, through tonic's `tls-ring` transport.
//!
//! - [`ServerTls`] is `hub.tls` (certificate and key, optionally a client
//!   CA that makes the hub require client certificates), read and checked
//!   when the config is loaded.
//! - [`ClientTls`] is a node's `tls` map (or the CLI's `--ca`, `--cert`,
//!   `--key`): a private CA to trust instead of the webpki roots, a client
//!   certificate for mutual TLS, the name to check the hub's certificate
//!   against.
//! - [`endpoint`] builds the tonic endpoint for a hub URL: `https://` turns
//!   TLS on, `http://` with TLS settings is refused.
//! - [`explain`] turns a failed connection into one line that says what to
//!   change (`certificate not trusted: set … to the CA that signed the
//!   hub's certificate`), and [`probe_tls`] tells a plaintext client that
//!   the hub it reached speaks TLS.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// How long a TLS handshake may take, on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs rustls's ring provider as the process default, once; later
/// calls (and a provider installed already) change nothing. Call it at
/// start-up so no library ever has to pick a provider.
pub fn install_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The process's rustls provider (ring unless one was installed).
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// `hub.tls`: the hub serves gRPC over TLS.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server certificate chain (PEM), as configured.
    pub cert: PathBuf,
    /// Its private key (PEM), as configured.
    pub key: PathBuf,
    /// With it, the hub requires client certificates signed by this CA.
    pub client_ca: Option<PathBuf>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("client_ca", &self.client_ca)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads and checks the files (absolute paths); `at` names the map in
    /// errors (`hub.tls`).
    pub fn load(
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
        at: &str,
    ) -> Result<ServerTls, String> {
        let cert_pem = read_file(&cert, &format!("{at}.cert"))?;
        let chain = parse_certs(&cert_pem, &cert, &format!("{at}.cert"))?;
        let key_pem = read_file(&key, &format!("{at}.key"))?;
        let private = parse_key(&key_pem, &key, &format!("{at}.key"))?;
        let client_ca_pem = match &client_ca {
            Some(p) => {
                let pem = read_file(p, &format!("{at}.client_ca"))?;
                let cas = parse_certs(&pem, p, &format!("{at}.client_ca"))?;
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(cas);
                if added == 0 {
                    return Err(format!(
                        "{at}.client_ca: {} holds no usable CA certificate: give the PEM certificate of the CA that signs the nodes' client certificates",
                        p.display()
                    ));
                }
                Some(pem)
            }
            None => None,
        };
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{at}: {e}"))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| {
                format!(
                    "{at}: the key {} does not fit the certificate {} ({e}): give the key the certificate was issued for",
                    key.display(),
                    cert.display()
                )
            })?;
        Ok(ServerTls {
            cert,
            key,
            client_ca,
            cert_pem,
            key_pem,
            client_ca_pem,
        })
    }

    /// Whether clients must present a certificate (`client_ca` is set).
    pub fn is_mutual(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// The tonic server configuration.
    pub fn tonic_config(&self) -> ServerTlsConfig {
        let mut c = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_pem {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        c
    }
}

/// A node's `tls` map (or the CLI's flags): how to speak TLS to the hub.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// A private CA to trust (otherwise the webpki roots).
    pub ca: Option<PathBuf>,
    /// A client certificate (mutual TLS), with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's key.
    pub key: Option<PathBuf>,
    /// The name the hub's certificate must carry (default: the URL's host).
    pub server_name: Option<String>,
    ca_pem: Option<Vec<u8>>,
    cert_pem: Option<Vec<u8>>,
    key_pem: Option<Vec<u8>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Where the client TLS settings come from, for the "what to do" part of
/// error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hints {
    /// The setting naming the CA (`nodes[0].tls.ca`, `--ca`).
    pub ca: String,
    /// The setting naming the client certificate.
    pub cert: String,
    /// The setting naming the client key.
    pub key: String,
    /// The setting naming the server name.
    pub server_name: String,
    /// The setting holding the hub URL.
    pub url: String,
}

impl Hints {
    /// The settings of the node at `at` (`nodes[0]`) in a config file.
    pub fn node(at: &str) -> Hints {
        Hints {
            ca: format!("{at}.tls.ca"),
            cert: format!("{at}.tls.cert"),
            key: format!("{at}.tls.key"),
            server_name: format!("{at}.tls.server_name"),
            url: format!("{at}.hub"),
        }
    }

    /// The command-line flags.
    pub fn cli() -> Hints {
        Hints {
            ca: "--ca".into(),
            cert: "--cert".into(),
            key: "--key".into(),
            server_name: "--tls-server-name".into(),
            url: "--hub".into(),
        }
    }
}

impl ClientTls {
    /// Reads and checks the files (absolute paths); `at` names the map in
    /// errors (`nodes[0].tls`, or the flags).
    pub fn load(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        server_name: Option<String>,
        hints: &Hints,
    ) -> Result<ClientTls, String> {
        let ca_pem = match &ca {
            Some(p) => {
                let pem = read_file(p, &hints.ca)?;
                let cas = parse_certs(&pem, p, &hints.ca)?;
                let mut roots = rustls::RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(cas);
                if added == 0 {
                    return Err(format!(
                        "{}: {} holds no usable CA certificate: give the PEM certificate of the CA that signed the hub's certificate",
                        hints.ca,
                        p.display()
                    ));
                }
                Some(pem)
            }
            None => None,
        };
        let (cert_pem, key_pem) = match (&cert, &key) {
            (Some(c), Some(k)) => {
                let cert_pem = read_file(c, &hints.cert)?;
                let chain = parse_certs(&cert_pem, c, &hints.cert)?;
                let key_pem = read_file(k, &hints.key)?;
                let private = parse_key(&key_pem, k, &hints.key)?;
                rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("{}: {e}", hints.cert))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_client_auth_cert(chain, private)
                    .map_err(|e| {
                        format!(
                            "{}: the key {} does not fit the certificate {} ({e}): give the key the client certificate was issued for",
                            hints.key,
                            k.display(),
                            c.display()
                        )
                    })?;
                (Some(cert_pem), Some(key_pem))
            }
            (None, None) => (None, None),
            (None, Some(_)) => {
                return Err(format!(
                    "{} is set without {}: give both (a client certificate and its key) or neither",
                    hints.key, hints.cert
                ));
            }
            (Some(_), None) => {
                return Err(format!(
                    "{} is set without {}: give both (a client certificate and its key) or neither",
                    hints.cert, hints.key
                ));
            }
        };
        if let Some(name) = &server_name
            && ServerName::try_from(name.as_str()).is_err()
        {
            return Err(format!(
                "{}: `{name}` is not a DNS name or IP address: give the name the hub's certificate carries",
                hints.server_name
            ));
        }
        Ok(ClientTls {
            ca,
            cert,
            key,
            server_name,
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    /// Whether a client certificate is configured.
    pub fn has_client_cert(&self) -> bool {
        self.cert_pem.is_some()
    }

    /// The tonic client configuration.
    pub fn tonic_config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().timeout(HANDSHAKE_TIMEOUT);
        c = match &self.ca_pem {
            Some(ca) => c.ca_certificate(Certificate::from_pem(ca)),
            None => c.with_webpki_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.cert_pem, &self.key_pem) {
            c = c.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            c = c.domain_name(name.clone());
        }
        c
    }
}

/// Whether `url` asks for TLS (`https://`).
pub fn is_https(url: &str) -> bool {
    url.starts_with("https://")
}

/// The endpoint for the hub at `url`: TLS for `https://` (with `tls`, or
/// the webpki roots without it), plaintext for `http://` (where `tls`
/// settings are an error).
pub fn endpoint(url: &str, tls: Option<&ClientTls>, hints: &Hints) -> Result<Endpoint, String> {
    let https = is_https(url);
    if !https && !url.starts_with("http://") {
        return Err(format!(
            "{}: `{url}` is not an http:// or https:// URL: use e.g. https://HOST:PORT",
            hints.url
        ));
    }
    if !https && tls.is_some() {
        return Err(format!(
            "{}: {url} is plaintext http:// but TLS settings are given: use https:// to speak TLS to the hub, or remove the TLS settings",
            hints.url
        ));
    }
    let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| {
        format!(
            "{}: invalid URL {url} ({e}): use http://HOST:PORT or https://HOST:PORT",
            hints.url
        )
    })?;
    if !https {
        return Ok(endpoint);
    }
    let config = tls.cloned().unwrap_or_default().tonic_config();
    endpoint.tls_config(config).map_err(|e| {
        format!(
            "{}: cannot set up TLS for {url} ({}): check the host name or set {}",
            hints.url,
            chain_text(&e),
            hints.server_name
        )
    })
}

/// The error and its sources, `: `-joined, without repeats.
pub fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

fn find_rustls<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(r);
        }
        cur = e.source();
    }
    None
}

fn find_io_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = e.source();
    }
    None
}

/// One line saying why a TLS connection to the hub at `url` failed and
/// what to change, when the failure is a TLS one (`None` otherwise).
/// `tls` is what the client was configured with.
pub fn explain(
    err: &(dyn std::error::Error + 'static),
    url: &str,
    tls: Option<&ClientTls>,
    hints: &Hints,
) -> Option<String> {
    use rustls::AlertDescription as A;
    use rustls::CertificateError as C;
    if !is_https(url) {
        return None;
    }
    let has_cert = tls.is_some_and(ClientTls::has_client_cert);
    let has_ca = tls.is_some_and(|t| t.ca.is_some());
    let untrusted = || {
        if has_ca {
            format!(
                "certificate not trusted: set {} to the CA that signed the hub's certificate (the configured CA did not sign it)",
                hints.ca
            )
        } else {
            format!(
                "certificate not trusted: set {} to the CA that signed the hub's certificate (only the public webpki roots are trusted now)",
                hints.ca
            )
        }
    };
    let needs_cert = || {
        format!(
            "the hub requires a client certificate (its hub.tls.client_ca is set): set {} and {} to a certificate signed by that CA and its key",
            hints.cert, hints.key
        )
    };
    // An alert that arrives after the handshake (TLS 1.3 refuses a client
    // certificate only then) reaches us through h2, which keeps only its
    // text: rustls's `received fatal alert: NAME`.
    let from_text = find_rustls(err)
        .is_none()
        .then(|| alert_in_text(&chain_text(err)))
        .flatten();
    let found = find_rustls(err)
        .cloned()
        .or(from_text.map(rustls::Error::AlertReceived));
    let message = match found.as_ref() {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension => untrusted(),
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "the hub's certificate is not valid for the host in {url} ({c}): connect by a name or address the certificate lists, or set {} to one",
                hints.server_name
            ),
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => {
                format!(
                    "the hub's certificate is outside its validity period ({c}): renew the hub's certificate (or fix this machine's clock)"
                )
            }
            C::Revoked => {
                "the hub's certificate is revoked: give the hub a new certificate".to_owned()
            }
            other => format!(
                "the hub's certificate was refused ({other}): give the hub a certificate for server authentication signed by the CA in {}",
                hints.ca
            ),
        },
        Some(rustls::Error::AlertReceived(alert)) => match alert {
            A::CertificateRequired => needs_cert(),
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::AccessDenied
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::DecryptError => {
                if has_cert {
                    format!(
                        "the hub refused the client certificate ({alert:?}): set {} to a certificate signed by the CA in the hub's hub.tls.client_ca (and not expired)",
                        hints.cert
                    )
                } else {
                    needs_cert()
                }
            }
            A::HandshakeFailure if !has_cert => needs_cert(),
            other => format!(
                "the hub ended the TLS handshake with alert {other:?}: compare the hub's hub.tls settings with {}",
                hints.url
            ),
        },
        Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
            format!(
                "the hub does not answer TLS (it seems to be plaintext): use http:// in {} for a hub without hub.tls, or set hub.tls on the hub",
                hints.url
            )
        }
        Some(rustls::Error::NoApplicationProtocol) => format!(
            "the server at {url} does not speak HTTP/2 over TLS (no ALPN h2): point {} at the syncmesh hub",
            hints.url
        ),
        Some(other) => format!(
            "TLS handshake failed ({other}): check the hub's hub.tls and {}",
            hints.ca
        ),
        None => {
            let text = chain_text(err);
            if text.contains("HTTP/2 was not negotiated") {
                format!(
                    "the server at {url} did not negotiate HTTP/2 over TLS: point {} at the syncmesh hub",
                    hints.url
                )
            } else if text.contains("TLS handshake timed out") || text.contains("handshake timeout")
            {
                format!(
                    "the TLS handshake timed out: is the hub at {url} serving TLS (hub.tls)? a plaintext hub needs http:// in {}",
                    hints.url
                )
            } else if find_io_kind(err) == Some(std::io::ErrorKind::UnexpectedEof)
                || text.contains("close_notify")
            {
                format!(
                    "the hub closed the connection during the TLS handshake: is it serving TLS (hub.tls)? a plaintext hub needs http:// in {}",
                    hints.url
                )
            } else {
                return None;
            }
        }
    };
    Some(message)
}

/// What [`diagnose`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Diagnosis {
    /// A TLS failure, explained in one line.
    Tls(String),
    /// A plaintext connection failed (and was not refused): the hub may
    /// speak TLS; [`Diagnosis::resolve`] asks it.
    MaybeTlsHub,
    /// A TLS connection failed without a TLS reason in the error (the
    /// server's alert was lost in a closed connection):
    /// [`Diagnosis::resolve`] repeats the handshake alone to read it.
    MaybeTlsRefusal(Option<ClientTls>),
    /// Nothing TLS about it.
    Other,
}

/// [`explain`], or for a plaintext `http://` client whose connection
/// failed without being refused, [`Diagnosis::MaybeTlsHub`].
pub fn diagnose(
    err: &(dyn std::error::Error + 'static),
    url: &str,
    tls: Option<&ClientTls>,
    hints: &Hints,
) -> Diagnosis {
    if let Some(m) = explain(err, url, tls, hints) {
        return Diagnosis::Tls(m);
    }
    if find_io_kind(err) == Some(std::io::ErrorKind::ConnectionRefused) {
        return Diagnosis::Other;
    }
    if is_https(url) {
        return Diagnosis::MaybeTlsRefusal(tls.cloned());
    }
    Diagnosis::MaybeTlsHub
}

impl Diagnosis {
    /// The line to show, if the failure is a TLS one (probing the hub with
    /// [`probe_tls`] for [`Diagnosis::MaybeTlsHub`]).
    pub async fn resolve(self, url: &str, hints: &Hints) -> Option<String> {
        match self {
            Diagnosis::Tls(m) => Some(m),
            Diagnosis::MaybeTlsHub if probe_tls(url).await => {
                Some(plaintext_to_tls_hub(url, hints))
            }
            Diagnosis::MaybeTlsRefusal(tls) => probe_handshake(url, tls.as_ref(), hints).await,
            _ => None,
        }
    }
}

/// The alert named in rustls's `received fatal alert: NAME` text.
fn alert_in_text(text: &str) -> Option<rustls::AlertDescription> {
    use rustls::AlertDescription as A;
    let name = text.split("received fatal alert: ").nth(1)?;
    let name: String = name
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    [
        A::CertificateRequired,
        A::BadCertificate,
        A::UnknownCA,
        A::CertificateUnknown,
        A::AccessDenied,
        A::DecryptError,
        A::HandshakeFailure,
        A::UnsupportedCertificate,
        A::CertificateExpired,
        A::CertificateRevoked,
        A::ProtocolVersion,
        A::DecodeError,
        A::IllegalParameter,
        A::InternalError,
    ]
    .into_iter()
    .find(|a| format!("{a:?}") == name)
}

/// The `host:port` of an `http(s)://` URL.
pub fn authority(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let auth = rest.split('/').next()?;
    if auth.is_empty() {
        return None;
    }
    if auth.contains(':') && !auth.ends_with(']') {
        Some(auth.to_owned())
    } else if is_https(url) {
        Some(format!("{auth}:443"))
    } else {
        Some(format!("{auth}:80"))
    }
}

/// Whether the server at `url`'s address answers a plaintext HTTP/2
/// preface with a TLS alert record, i.e. it expects TLS. Used only after a
/// plaintext connection failed, to tell the user to use `https://`.
pub async fn probe_tls(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(addr) = authority(url) else {
        return false;
    };
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr.as_str()).await.ok()?;
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .ok()?;
        let mut first = [0u8; 3];
        s.read_exact(&mut first).await.ok()?;
        // A TLS record: content type alert (21), version 3.x.
        Some(first[0] == 21 && first[1] == 3)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Repeats the TLS handshake with the hub at `url` alone (as `tls`
/// says), then waits for what the hub sends first without sending
/// anything: a hub that refuses the client (a missing or unknown client
/// certificate) sends its alert then, and nothing can close the
/// connection before it is read. The explanation, if it is a TLS failure.
pub async fn probe_handshake(url: &str, tls: Option<&ClientTls>, hints: &Hints) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let addr = authority(url)?;
    let host = match tls.and_then(|t| t.server_name.clone()) {
        Some(n) => n,
        None => {
            let (h, _) = addr.rsplit_once(':')?;
            h.trim_start_matches('[').trim_end_matches(']').to_owned()
        }
    };
    let name = ServerName::try_from(host).ok()?;
    let none = Path::new("");
    let mut roots = rustls::RootCertStore::empty();
    match tls.and_then(|t| t.ca_pem.as_ref()) {
        Some(pem) => {
            roots.add_parsable_certificates(parse_certs(pem, none, "ca").ok()?);
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let mut config = match tls.and_then(|t| t.cert_pem.as_ref().zip(t.key_pem.as_ref())) {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                parse_certs(cert, none, "cert").ok()?,
                parse_key(key, none, "key").ok()?,
            )
            .ok()?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr.as_str()).await.ok()?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let mut stream = match connector.connect(name, tcp).await {
            Ok(s) => s,
            Err(e) => return explain(&e, url, tls, hints),
        };
        let mut buf = [0u8; 64];
        match stream.read(&mut buf).await {
            Err(e) => explain(&e, url, tls, hints),
            Ok(_) => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

/// The line for a plaintext client whose hub speaks TLS.
pub fn plaintext_to_tls_hub(url: &str, hints: &Hints) -> String {
    format!(
        "the hub at {url} speaks TLS but the URL is plaintext http://: use https:// in {} (and set {} to the CA that signed the hub's certificate if it is a private one)",
        hints.url, hints.ca
    )
}

/// The bytes of `path`; `at` names the setting in the error.
pub(crate) fn read_file(path: &Path, at: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "{at}: {} does not exist: fix the path or create the file",
                path.display()
            )
        } else {
            format!(
                "{at}: cannot read {} ({e}): make it readable by this process",
                path.display()
            )
        }
    })
}

/// The certificates of a PEM file (at least one, each a parsable X.509
/// certificate); `at` names the setting in errors.
pub(crate) fn parse_certs(
    pem: &[u8],
    path: &Path,
    at: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        match item {
            Ok(c) => certs.push(c),
            Err(e) => {
                return Err(format!(
                    "{at}: {} is not valid PEM ({e}): give a PEM file with -----BEGIN CERTIFICATE----- blocks",
                    path.display()
                ));
            }
        }
    }
    if certs.is_empty() {
        return Err(format!(
            "{at}: {} holds no PEM certificate: give a PEM file with a -----BEGIN CERTIFICATE----- block",
            path.display()
        ));
    }
    for c in &certs {
        if webpki_roots_parse(c).is_err() {
            return Err(format!(
                "{at}: {} holds a certificate that does not parse: give a valid X.509 certificate in PEM",
                path.display()
            ));
        }
    }
    Ok(certs)
}

fn webpki_roots_parse(c: &CertificateDer<'_>) -> Result<(), ()> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.clone()).map_err(|_| ())
}

fn parse_key(pem: &[u8], path: &Path, at: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        format!(
            "{at}: {} holds no PEM private key ({e}): give the key as PEM (-----BEGIN PRIVATE KEY-----, RSA or EC)",
            path.display()
        )
    })
}
