//! Just enough of PostgreSQL's streaming replication protocol to read a
//! logical slot: a `replication=database` connection, SCRAM-SHA-256, md5
//! or cleartext authentication, `START_REPLICATION SLOT … LOGICAL`, the
//! `XLogData` / keepalive messages of the copy-both stream and standby
//! status updates. sqlx does not speak it.
//!
//! Why: `pg_logical_slot_peek_binary_changes` and
//! `pg_replication_slot_advance` decode the WAL again from the slot's
//! `restart_lsn` on every call, and PostgreSQL 15 moves `restart_lsn` only
//! at its running-transactions records (about every 15 s), so under a
//! steady load every peek re-decodes up to 15 s of WAL. A walsender keeps
//! its decoding state for the life of the connection and decodes each
//! record once, as native logical replication does.
//!
//! The payload of each `XLogData` message is one pgoutput message, the
//! same bytes the peek function returns in its `data` column, so the
//! adapter parses both alike. The stream never confirms more than the
//! adapter asks for ([`ReplStream::confirm`]: the core's durable
//! checkpoint), also when it answers a keepalive.
//!
//! The connection speaks TLS (rustls, ring provider) when the URL's
//! `sslmode` is `require` (encrypt only; with `sslrootcert`, as
//! `verify-ca`), `verify-ca` (the chain up to `sslrootcert` or the Mozilla
//! roots) or `verify-full` (also the host name), like the node's other
//! connections (sqlx); `prefer`, `allow` and `disable` connect without it.
//!
//! What makes streaming unavailable ([`StreamError::Unavailable`]: the
//! adapter then reads the slot with the peek function): an authentication
//! method other than SCRAM-SHA-256, md5, cleartext or trust, no password,
//! or a server that refuses replication connections (pg_hba, privileges).
//! Everything decoded from the server is bounded ([`MAX_MESSAGE_BYTES`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Buf, BytesMut};
use rand::Rng as _;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest backend message accepted (PostgreSQL's own limit on a field is
/// 1 GB; a pgoutput message carries one row).
pub const MAX_MESSAGE_BYTES: usize = (1 << 30) + 1024;
/// Most PBKDF2 iterations a server may ask for (PostgreSQL's default is
/// 4096): a hostile server cannot make the node spin.
const MAX_SCRAM_ITERATIONS: u32 = 1 << 20;
/// A standby status update at least this often (the server drops a
/// consumer silent for `wal_sender_timeout`, 60 s by default).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How long the rest of a transaction may take to arrive once its `BEGIN`
/// did (the walsender sends a transaction in one go at its commit).
const MID_TX_WAIT: Duration = Duration::from_secs(30);
/// A window goes on while the next transaction follows within this.
pub const WINDOW_GAP: Duration = Duration::from_millis(1);
/// How long a window may keep waiting for more transactions.
pub const WINDOW_BUDGET: Duration = Duration::from_millis(20);
/// Time allowed for connecting, authenticating and starting the stream.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for creating the temporary slot of an exported snapshot
/// (it waits for the transactions running at that moment to end).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(300);
/// Microseconds from the Unix epoch to 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Why the stream failed.
#[derive(Debug)]
pub enum StreamError {
    /// Streaming cannot work with this server or URL: read the slot
    /// another way. The text says why.
    Unavailable(String),
    /// The server sent an error (SQLSTATE and message).
    Server {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// The connection failed or the server broke the protocol.
    Io(String),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Unavailable(m) | StreamError::Io(m) => f.write_str(m),
            StreamError::Server { code, message } => write!(f, "{message} (SQLSTATE {code})"),
        }
    }
}

type SResult<T> = std::result::Result<T, StreamError>;

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnParams {
    /// TCP host and port, or a unix socket file.
    pub addr: Addr,
    /// Role name.
    pub user: String,
    /// Password, if any.
    pub password: Option<String>,
    /// Database name.
    pub database: String,
    /// Session settings sent in the startup packet (they shape the text of
    /// the values pgoutput sends).
    pub settings: Vec<(String, String)>,
    /// TLS over TCP (the URL's `sslmode` is `require` or stricter).
    pub tls: Option<TlsParams>,
}

/// How the replication connection speaks TLS.
#[derive(Clone)]
pub struct TlsParams {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

/// How much of the server's certificate to check (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsVerify {
    /// `require`: encrypt, check nothing (unless a root certificate is
    /// given: then as `verify-ca`, as libpq does).
    None,
    /// `verify-ca`: the chain up to a trusted root.
    Chain,
    /// `verify-full`: the chain and that it names the host.
    Full,
}

impl TlsParams {
    /// TLS to `host`, checking as `verify` says against the PEM roots in
    /// `root_cert` (else the Mozilla roots of `webpki-roots`).
    pub fn new(
        host: &str,
        verify: TlsVerify,
        root_cert: Option<&Path>,
    ) -> Result<TlsParams, String> {
        let provider = crate::tls::provider();
        let verify = match (verify, root_cert) {
            (TlsVerify::None, Some(_)) => TlsVerify::Chain,
            (v, _) => v,
        };
        let mut roots = rustls::RootCertStore::empty();
        match root_cert {
            Some(path) => {
                let pem = crate::tls::read_file(path, "sslrootcert")?;
                for c in crate::tls::parse_certs(&pem, path, "sslrootcert")? {
                    roots
                        .add(c)
                        .map_err(|e| format!("sslrootcert: {}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| format!("TLS roots: {e}"))?;
        let verifier = Verifier {
            inner: (verify != TlsVerify::None).then_some(webpki),
            check_name: verify == TlsVerify::Full,
            provider: provider.clone(),
        };
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let server_name =
            ServerName::try_from(host.to_owned()).map_err(|e| format!("TLS: host {host}: {e}"))?;
        Ok(TlsParams {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// The server certificate check of [`TlsVerify`].
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        let Some(inner) = &self.inner else {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnParams")
            .field("addr", &self.addr)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// A server address.
#[derive(Clone, Debug)]
pub enum Addr {
    /// Host name or IP, and port.
    Tcp(String, u16),
    /// The socket file (`<dir>/.s.PGSQL.<port>`).
    Unix(PathBuf),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

/// An open copy-both stream of one logical slot.
pub struct ReplStream {
    io: Box<dyn Io>,
    buf: BytesMut,
    /// The highest LSN confirmed to the server (flushed by the caller).
    confirmed: i64,
    last_status: Instant,
}

impl fmt::Debug for ReplStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplStream")
            .field("confirmed", &self.confirmed)
            .finish_non_exhaustive()
    }
}

/// SSLRequest, then the TLS handshake on `s`.
async fn start_tls(
    mut s: tokio::net::TcpStream,
    tls: &TlsParams,
    host: &str,
) -> SResult<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut req = Vec::with_capacity(8);
    req.extend_from_slice(&8i32.to_be_bytes());
    req.extend_from_slice(&80_877_103i32.to_be_bytes());
    s.write_all(&req)
        .await
        .map_err(|e| io_err("asking for TLS", e))?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer)
        .await
        .map_err(|e| io_err("asking for TLS", e))?;
    if answer[0] != b'S' {
        return Err(StreamError::Io(format!(
            "{host} does not offer TLS (ssl = off in postgresql.conf) and the URL's sslmode requires it"
        )));
    }
    tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(tls.server_name.clone(), s)
        .await
        .map_err(|e| StreamError::Io(format!("TLS handshake with {host}: {e}")))
}

/// A message from the server, before the copy stream.
struct Frame {
    tag: u8,
    body: BytesMut,
}

fn be_i32(b: &[u8]) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    i32::from_be_bytes(a)
}

/// The text fields of a `DataRow` (`None`: NULL), bounded by the message.
fn data_row(body: &[u8]) -> SResult<Vec<Option<String>>> {
    let bad = || StreamError::Io("malformed DataRow".into());
    if body.len() < 2 {
        return Err(bad());
    }
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let len = body.get(at..at + 4).map(be_i32).ok_or_else(bad)?;
        at += 4;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = body.get(at..at + len as usize).ok_or_else(bad)?;
        at += len as usize;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    Ok(out)
}

/// The fields of an `ErrorResponse` / `NoticeResponse`.
fn server_error(body: &[u8]) -> StreamError {
    let mut code = String::new();
    let mut message = String::new();
    for field in body.split(|b| *b == 0) {
        let Some((&t, text)) = field.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(text).into_owned();
        match t {
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
    }
    StreamError::Server { code, message }
}

/// A frontend message: tag, length, body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(body.len() + 5);
    m.push(tag);
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn io_err(what: &str, e: impl fmt::Display) -> StreamError {
    StreamError::Io(format!("{what}: {e}"))
}

impl ReplStream {
    /// Connects, authenticates and starts streaming `slot` with pgoutput
    /// for `publication` from `start_lsn` (the caller's durable
    /// checkpoint, also confirmed at once; 0: from the slot's position).
    pub async fn start(
        params: &ConnParams,
        slot: &str,
        publication: &str,
        start_lsn: i64,
    ) -> SResult<ReplStream> {
        match tokio::time::timeout(
            START_TIMEOUT,
            Self::start_inner(params, slot, publication, start_lsn),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(StreamError::Io(format!(
                "starting the replication stream took longer than {} s",
                START_TIMEOUT.as_secs()
            ))),
        }
    }

    /// Opens and authenticates a replication connection and closes it
    /// again (no slot is touched): whether capture can stream.
    pub async fn probe(params: &ConnParams) -> SResult<()> {
        let run = async {
            let mut s = Self::connect(params).await?;
            s.send(&message(b'X', &[])).await
        };
        match tokio::time::timeout(START_TIMEOUT, run).await {
            Ok(r) => r,
            Err(_) => Err(StreamError::Io(format!(
                "opening a replication connection took longer than {} s",
                START_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn start_inner(
        params: &ConnParams,
        slot: &str,
        publication: &str,
        start_lsn: i64,
    ) -> SResult<ReplStream> {
        let mut s = Self::connect(params).await?;
        let query = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names '{}')",
            crate::postgres::quote_ident(slot),
            crate::postgres::format_lsn(start_lsn),
            crate::postgres::quote_ident(publication).replace('\'', "''"),
        );
        let mut q = Vec::new();
        cstr(&mut q, &query);
        s.send(&message(b'Q', &q)).await?;
        loop {
            let f = s.frame().await?;
            match f.tag {
                b'W' => break,
                b'E' => return Err(server_error(&f.body)),
                b'N' | b'S' => {}
                t => {
                    return Err(StreamError::Io(format!(
                        "unexpected message {:?} in answer to START_REPLICATION",
                        t as char
                    )));
                }
            }
        }
        if start_lsn > 0 {
            s.confirm(start_lsn).await?;
        }
        Ok(s)
    }

    /// Creates a temporary logical slot `temp_slot` that exports its
    /// snapshot: returns the connection (the snapshot can be imported with
    /// `SET TRANSACTION SNAPSHOT` until it is dropped; dropping it also
    /// drops the slot), the slot's consistent point (a transaction is in
    /// the snapshot iff its commit record ends at or below it) and the
    /// snapshot's name.
    pub async fn export_snapshot(
        params: &ConnParams,
        temp_slot: &str,
    ) -> SResult<(ReplStream, i64, String)> {
        let run = async {
            let mut s = Self::connect(params).await?;
            let mut q = Vec::new();
            cstr(
                &mut q,
                &format!(
                    "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                    crate::postgres::quote_ident(temp_slot)
                ),
            );
            s.send(&message(b'Q', &q)).await?;
            let mut row: Option<Vec<Option<String>>> = None;
            loop {
                let f = s.frame().await?;
                match f.tag {
                    b'D' => row = Some(data_row(&f.body)?),
                    b'E' => return Err(server_error(&f.body)),
                    b'Z' => break,
                    _ => {}
                }
            }
            let row = row
                .ok_or_else(|| StreamError::Io("CREATE_REPLICATION_SLOT returned no row".into()))?;
            let field = |i: usize| row.get(i).cloned().flatten();
            let lsn = field(1)
                .as_deref()
                .and_then(crate::postgres::parse_lsn)
                .ok_or_else(|| {
                    StreamError::Io(format!(
                        "CREATE_REPLICATION_SLOT returned no consistent point: {row:?}"
                    ))
                })?;
            let name = field(2).ok_or_else(|| {
                StreamError::Io(format!(
                    "CREATE_REPLICATION_SLOT exported no snapshot: {row:?}"
                ))
            })?;
            Ok((s, lsn, name))
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, run).await {
            Ok(r) => r,
            Err(_) => Err(StreamError::Io(format!(
                "creating a temporary slot to export a snapshot took longer than {} s (a long-running transaction delays it)",
                EXPORT_TIMEOUT.as_secs()
            ))),
        }
    }

    /// A replication connection, authenticated and ready for a command.
    async fn connect(params: &ConnParams) -> SResult<ReplStream> {
        let io: Box<dyn Io> = match &params.addr {
            Addr::Tcp(host, port) => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|e| io_err(&format!("connecting to {host}:{port}"), e))?;
                let _ = s.set_nodelay(true);
                match &params.tls {
                    None => Box::new(s),
                    Some(tls) => Box::new(start_tls(s, tls, host).await?),
                }
            }
            Addr::Unix(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| io_err(&format!("connecting to {}", path.display()), e))?,
            ),
        };
        let mut s = ReplStream {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            confirmed: 0,
            last_status: Instant::now(),
        };
        let mut startup = Vec::new();
        startup.extend_from_slice(&[0, 0, 0, 0]);
        startup.extend_from_slice(&196608i32.to_be_bytes());
        for (k, v) in [
            ("user", params.user.as_str()),
            ("database", params.database.as_str()),
            ("replication", "database"),
            ("application_name", "syncmesh"),
        ] {
            cstr(&mut startup, k);
            cstr(&mut startup, v);
        }
        for (k, v) in &params.settings {
            cstr(&mut startup, k);
            cstr(&mut startup, v);
        }
        startup.push(0);
        let len = (startup.len() as i32).to_be_bytes();
        startup[..4].copy_from_slice(&len);
        s.send(&startup).await?;
        s.authenticate(params).await?;
        // ParameterStatus, BackendKeyData, notices ... ReadyForQuery.
        loop {
            let f = s.frame().await?;
            match f.tag {
                b'Z' => break,
                b'E' => return Err(refused(server_error(&f.body))),
                _ => {}
            }
        }
        Ok(s)
    }

    async fn authenticate(&mut self, params: &ConnParams) -> SResult<()> {
        let mut scram: Option<Scram> = None;
        loop {
            let f = self.frame().await?;
            match f.tag {
                b'E' => return Err(refused(server_error(&f.body))),
                b'N' => continue,
                b'R' => {}
                t => {
                    return Err(StreamError::Io(format!(
                        "unexpected message {:?} during authentication",
                        t as char
                    )));
                }
            }
            if f.body.len() < 4 {
                return Err(StreamError::Io("short authentication message".into()));
            }
            let code = be_i32(&f.body);
            let data = &f.body[4..];
            let password = || {
                params.password.clone().ok_or_else(|| {
                    StreamError::Unavailable(
                        "the server asks for a password and the URL has none (nor PGPASSWORD)"
                            .into(),
                    )
                })
            };
            match code {
                0 => return Ok(()),
                3 => {
                    let mut body = Vec::new();
                    cstr(&mut body, &password()?);
                    self.send(&message(b'p', &body)).await?;
                }
                10 => {
                    let offered: Vec<&[u8]> =
                        data.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                    if !offered.contains(&&b"SCRAM-SHA-256"[..]) {
                        return Err(StreamError::Unavailable(format!(
                            "the server offers SASL mechanisms {:?}, the streaming reader speaks SCRAM-SHA-256",
                            offered
                                .iter()
                                .map(|m| String::from_utf8_lossy(m).into_owned())
                                .collect::<Vec<_>>()
                        )));
                    }
                    let nonce: [u8; 18] = rand::rng().random();
                    let st = Scram::new(
                        "",
                        &password()?,
                        &base64::engine::general_purpose::STANDARD.encode(nonce),
                    );
                    let first = st.client_first();
                    let mut body = Vec::new();
                    cstr(&mut body, "SCRAM-SHA-256");
                    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
                    body.extend_from_slice(first.as_bytes());
                    self.send(&message(b'p', &body)).await?;
                    scram = Some(st);
                }
                11 => {
                    let st = scram
                        .as_mut()
                        .ok_or_else(|| StreamError::Io("SASLContinue before SASL".into()))?;
                    let server_first = std::str::from_utf8(data)
                        .map_err(|_| StreamError::Io("SASLContinue is not UTF-8".into()))?;
                    let fin = st.client_final(server_first)?;
                    self.send(&message(b'p', fin.as_bytes())).await?;
                }
                12 => {
                    let st = scram
                        .as_ref()
                        .ok_or_else(|| StreamError::Io("SASLFinal before SASL".into()))?;
                    let server_final = std::str::from_utf8(data)
                        .map_err(|_| StreamError::Io("SASLFinal is not UTF-8".into()))?;
                    st.verify_server(server_final)?;
                }
                5 if data.len() >= 4 => {
                    let mut salt = [0u8; 4];
                    salt.copy_from_slice(&data[..4]);
                    let mut body = Vec::new();
                    cstr(&mut body, &md5_password(&params.user, &password()?, salt));
                    self.send(&message(b'p', &body)).await?;
                }
                c => {
                    return Err(StreamError::Unavailable(format!(
                        "the server asks for authentication method {c}, the streaming reader speaks SCRAM-SHA-256, md5 and cleartext"
                    )));
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> SResult<()> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|e| io_err("writing to the server", e))?;
        self.io
            .flush()
            .await
            .map_err(|e| io_err("writing to the server", e))
    }

    /// One complete message from the buffer, if it holds one.
    /// The length (tag included) of the whole message at the front of the
    /// buffer, `None` while it is not all there; an impossible length is
    /// an error.
    fn buffered_len(&self) -> SResult<Option<usize>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = be_i32(&self.buf[1..5]);
        if len < 4 || len as usize > MAX_MESSAGE_BYTES {
            return Err(StreamError::Io(format!(
                "the server sent a message of {len} bytes (limit {MAX_MESSAGE_BYTES})"
            )));
        }
        let total = 1 + len as usize;
        Ok((self.buf.len() >= total).then_some(total))
    }

    fn buffered_frame(&mut self) -> SResult<Option<Frame>> {
        let Some(total) = self.buffered_len()? else {
            return Ok(None);
        };
        let tag = self.buf[0];
        self.buf.advance(5);
        let body = self.buf.split_to(total - 5);
        Ok(Some(Frame { tag, body }))
    }

    /// Keeps at least 16 KiB free for the next read.
    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
    }

    /// Waits until a whole message (or an impossible length) is buffered,
    /// or the connection failed: the next read reports which. Cancel-safe:
    /// what it read stays buffered for the next read.
    pub async fn readable(&mut self) {
        while matches!(self.buffered_len(), Ok(None)) {
            self.make_room();
            match self.io.read_buf(&mut self.buf).await {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }

    /// Reads more bytes, waiting at most `wait` (zero: only what is there
    /// already). False if nothing came in time. Cancel-safe.
    async fn fill(&mut self, wait: Duration) -> SResult<bool> {
        self.make_room();
        match tokio::time::timeout(wait, self.io.read_buf(&mut self.buf)).await {
            Err(_) => Ok(false),
            Ok(Ok(0)) => Err(StreamError::Io("the server closed the connection".into())),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) => Err(io_err("reading from the server", e)),
        }
    }

    /// The next message, waiting as long as it takes (start-up only).
    async fn frame(&mut self) -> SResult<Frame> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            self.fill(START_TIMEOUT).await?;
        }
    }

    /// The next pgoutput message, waiting at most `wait` for it; answers
    /// keepalives on the way.
    pub async fn next(&mut self, wait: Duration) -> SResult<Option<BytesMut>> {
        let deadline = Instant::now() + wait;
        loop {
            if self.last_status.elapsed() >= STATUS_INTERVAL {
                self.send_status().await?;
            }
            while let Some(mut f) = self.buffered_frame()? {
                match f.tag {
                    b'd' => match f.body.first() {
                        Some(b'w') if f.body.len() >= 25 => {
                            f.body.advance(25);
                            return Ok(Some(f.body));
                        }
                        Some(b'k') if f.body.len() >= 18 => {
                            if f.body[17] == 1 {
                                self.send_status().await?;
                            }
                        }
                        other => {
                            return Err(StreamError::Io(format!(
                                "malformed copy data ({} bytes, kind {:?})",
                                f.body.len(),
                                other.map(|b| *b as char)
                            )));
                        }
                    },
                    b'E' => return Err(server_error(&f.body)),
                    b'N' => {}
                    b'c' => {
                        return Err(StreamError::Io("the server ended the stream".into()));
                    }
                    t => {
                        return Err(StreamError::Io(format!(
                            "unexpected message {:?} in the replication stream",
                            t as char
                        )));
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.fill(left).await? {
                return Ok(None);
            }
        }
    }

    /// Whole transactions of pgoutput messages: what arrives within
    /// `first_wait`, then more while transactions keep arriving without a
    /// pause of [`WINDOW_GAP`] (for at most [`WINDOW_BUDGET`]; after that
    /// only what is buffered already), stopping at a commit once
    /// `max_changes` row changes are in.
    pub async fn window(
        &mut self,
        max_changes: usize,
        first_wait: Duration,
    ) -> SResult<Vec<BytesMut>> {
        let started = Instant::now();
        let mut out = Vec::new();
        let mut changes = 0usize;
        let mut in_tx = false;
        loop {
            let wait = if in_tx {
                MID_TX_WAIT
            } else if out.is_empty() {
                first_wait
            } else if started.elapsed() < WINDOW_BUDGET {
                WINDOW_GAP
            } else {
                Duration::ZERO
            };
            let Some(msg) = self.next(wait).await? else {
                if in_tx {
                    return Err(StreamError::Io(format!(
                        "the rest of a transaction did not arrive within {} s",
                        MID_TX_WAIT.as_secs()
                    )));
                }
                break;
            };
            let tag = msg.first().copied();
            out.push(msg);
            match tag {
                Some(b'B') => in_tx = true,
                Some(b'C') => {
                    in_tx = false;
                    if changes >= max_changes {
                        break;
                    }
                }
                Some(b'I' | b'U' | b'D') => changes += 1,
                _ => {}
            }
        }
        Ok(out)
    }

    /// Confirms `lsn` (the caller flushed everything at or below it): the
    /// slot may release the WAL before it.
    pub async fn confirm(&mut self, lsn: i64) -> SResult<()> {
        if lsn > self.confirmed {
            self.confirmed = lsn;
            self.send_status().await?;
        }
        Ok(())
    }

    async fn send_status(&mut self) -> SResult<()> {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_US;
        let mut body = Vec::with_capacity(34);
        body.push(b'r');
        for _ in 0..3 {
            body.extend_from_slice(&self.confirmed.to_be_bytes());
        }
        body.extend_from_slice(&now_us.to_be_bytes());
        // No reply requested.
        body.push(0);
        self.last_status = Instant::now();
        self.send(&message(b'd', &body)).await
    }
}

/// A server error during connection or authentication: the ones that say
/// this server does not take replication connections from us make
/// streaming unavailable; others (a password the server refuses, a server
/// starting up) stay errors.
fn refused(e: StreamError) -> StreamError {
    match &e {
        // invalid_authorization_specification (pg_hba has no replication
        // line), insufficient_privilege (no REPLICATION attribute).
        StreamError::Server { code, message } if code == "28000" || code == "42501" => {
            StreamError::Unavailable(format!(
                "the server refuses a replication connection: {message}"
            ))
        }
        _ => e,
    }
}

/// The answer to an md5 challenge: `md5` + hex(md5(hex(md5(password +
/// user)) + salt)).
fn md5_password(user: &str, password: &str, salt: [u8; 4]) -> String {
    use md5::{Digest as _, Md5};
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let inner = hex(&Md5::digest(format!("{password}{user}").as_bytes()));
    let mut h = Md5::new();
    h.update(inner.as_bytes());
    h.update(salt);
    format!("md5{}", hex(&h.finalize()))
}

/// HMAC-SHA-256 of the concatenation of `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// SCRAM-SHA-256 without channel binding (RFC 5802 / 7677).
struct Scram {
    password: String,
    client_first_bare: String,
    nonce: String,
    /// The salted password and the auth message, once the server spoke.
    keys: Option<([u8; 32], String)>,
}

impl Scram {
    fn new(user: &str, password: &str, nonce: &str) -> Scram {
        Scram {
            password: password.to_owned(),
            client_first_bare: format!("n={user},r={nonce}"),
            nonce: nonce.to_owned(),
            keys: None,
        }
    }

    fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    fn client_final(&mut self, server_first: &str) -> SResult<String> {
        let bad = |why: &str| StreamError::Io(format!("SCRAM: {why} in {server_first:?}"));
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for attr in server_first.split(',') {
            match attr.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = v.parse::<u32>().ok(),
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| bad("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() <= self.nonce.len() {
            return Err(bad("the server nonce does not extend ours"));
        }
        let salt = base64::engine::general_purpose::STANDARD
            .decode(salt.ok_or_else(|| bad("no salt"))?)
            .map_err(|_| bad("the salt is not base64"))?;
        let iterations = iterations.ok_or_else(|| bad("no iteration count"))?;
        if iterations == 0 || iterations > MAX_SCRAM_ITERATIONS {
            return Err(bad("an iteration count out of range"));
        }
        // Hi(): PBKDF2-HMAC-SHA-256, one block.
        let pw = self.password.as_bytes();
        let mut u = hmac(pw, &[&salt, &1u32.to_be_bytes()]);
        let mut salted = u;
        for _ in 1..iterations {
            u = hmac(pw, &[&u]);
            for (s, x) in salted.iter_mut().zip(u) {
                *s ^= x;
            }
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, &[auth.as_bytes()]);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.keys = Some((salted, auth));
        Ok(format!(
            "{without_proof},p={}",
            base64::engine::general_purpose::STANDARD.encode(proof)
        ))
    }

    fn verify_server(&self, server_final: &str) -> SResult<()> {
        let Some((salted, auth)) = &self.keys else {
            return Err(StreamError::Io("SCRAM: final message out of order".into()));
        };
        let server_key = hmac(salted, &[b"Server Key"]);
        let expected =
            base64::engine::general_purpose::STANDARD.encode(hmac(&server_key, &[auth.as_bytes()]));
        match server_final.strip_prefix("v=") {
            Some(v) if v == expected => Ok(()),
            _ => Err(StreamError::Io(format!(
                "SCRAM: the server's signature does not match ({server_final:?}): not the server we asked"
            ))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The exchange of RFC 7677, section 3.
    #[test]
    fn scram_matches_the_rfc_7677_example() {
        let mut s = Scram::new("user", "pencil", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(s.client_first(), "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let fin = s
            .client_final(
                "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            )
            .unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_server("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(s.verify_server("v=AAAA").is_err());
    }

    #[test]
    fn scram_refuses_a_bad_server_first_message() {
        let mut s = Scram::new("", "pw", "abc");
        for bad in [
            "r=xyz1,s=AAAA,i=4096",
            "r=abc,s=AAAA,i=4096",
            "r=abcd,s=!!,i=4096",
            "r=abcd,s=AAAA,i=0",
            "r=abcd,s=AAAA,i=99999999",
            "r=abcd,s=AAAA",
        ] {
            assert!(s.client_final(bad).is_err(), "{bad}");
        }
    }

    /// The value libpq sends (checked against Python's hashlib).
    #[test]
    fn md5_answer_matches_libpq() {
        assert_eq!(
            md5_password("postgres", "secret", [1, 2, 3, 4]),
            "md5bb41a296aab6baccb36ff243a562abff"
        );
    }

    #[test]
    fn data_rows_are_parsed_and_bounded() {
        let mut body = vec![0, 3];
        for f in [Some(&b"ab"[..]), None, Some(&b""[..])] {
            match f {
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        assert_eq!(
            data_row(&body).unwrap(),
            vec![Some("ab".into()), None, Some(String::new())]
        );
        let mut short = vec![0, 1];
        short.extend_from_slice(&100i32.to_be_bytes());
        short.extend_from_slice(b"xy");
        assert!(data_row(&short).is_err());
        assert!(data_row(&[0]).is_err());
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// A stream over an in-memory pipe, and the server's end of it.
    fn in_memory_stream() -> (ReplStream, tokio::io::DuplexStream) {
        let (client, server) = tokio::io::duplex(1024);
        let s = ReplStream {
            io: Box::new(client),
            buf: BytesMut::new(),
            confirmed: 0,
            last_status: Instant::now(),
        };
        (s, server)
    }

    /// An XLogData copy-data message carrying `payload`.
    fn xlog_data(payload: &[u8]) -> Vec<u8> {
        let mut xlog = vec![b'w'];
        xlog.extend_from_slice(&[0u8; 24]);
        xlog.extend_from_slice(payload);
        message(b'd', &xlog)
    }

    /// Frames split anywhere are reassembled; an oversized length is an
    /// error, never an allocation.
    #[tokio::test]
    async fn frames_are_bounded_and_reassembled() {
        let (mut s, mut server) = in_memory_stream();
        let m = xlog_data(b"Bpayload");
        server.write_all(&m[..3]).await.unwrap();
        assert!(s.next(Duration::from_millis(20)).await.unwrap().is_none());
        server.write_all(&m[3..]).await.unwrap();
        let got = s.next(Duration::from_secs(5)).await.unwrap().unwrap();
        assert_eq!(&got[..], b"Bpayload");
        let mut huge = vec![b'd'];
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        server.write_all(&huge).await.unwrap();
        assert!(s.next(Duration::from_secs(5)).await.is_err());
    }

    /// `readable` wakes on a whole message only, keeps what it read when
    /// cancelled, and wakes when the server hangs up (the read then says
    /// so).
    #[tokio::test]
    async fn readable_waits_for_a_whole_message_and_keeps_what_it_read() {
        let (mut s, mut server) = in_memory_stream();
        let m = xlog_data(b"Cpayload");
        let short = Duration::from_millis(50);
        assert!(tokio::time::timeout(short, s.readable()).await.is_err());
        server.write_all(&m[..7]).await.unwrap();
        // Part of a message: still waiting (cancelled by the timeout).
        assert!(tokio::time::timeout(short, s.readable()).await.is_err());
        server.write_all(&m[7..]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), s.readable())
            .await
            .unwrap();
        let got = s.next(Duration::ZERO).await.unwrap().unwrap();
        assert_eq!(&got[..], b"Cpayload");
        drop(server);
        tokio::time::timeout(Duration::from_secs(5), s.readable())
            .await
            .unwrap();
        assert!(s.next(Duration::from_secs(1)).await.is_err());
    }
}
