//! The HTTP/1.1 server on a metrics address (`hub.metrics`, a node's
//! `metrics`): `GET /metrics` (Prometheus text), and where the owner
//! provides them `GET /` (the live status page) and `GET /status.json`.
//! Connections are bounded; each gets a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::Semaphore;

use crate::{Error, Result};

/// Most connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest a connection may stay open.
pub const CONNECTION_DEADLINE_MS: u64 = 30_000;

/// What the server serves.
pub trait Endpoints: Send + Sync + 'static {
    /// Prometheus text for `/metrics`.
    fn metrics(&self) -> BoxFuture<'static, String>;
    /// JSON for `/status.json`; `None` answers 404 (nodes have no page).
    fn status_json(&self) -> BoxFuture<'static, Option<String>>;
    /// HTML for `/`; `None` answers a one-line pointer to `/metrics`.
    fn index_html(&self) -> Option<&'static str>;
}

/// A running metrics server; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    resp
}

async fn handle(
    endpoints: Arc<dyn Endpoints>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET is served here\n".into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            endpoints.metrics().await,
        ),
        "/status.json" => match endpoints.status_json().await {
            Some(json) => respond(StatusCode::OK, "application/json", json),
            None => respond(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "no status here: the hub serves /status.json\n".into(),
            ),
        },
        "/" => match endpoints.index_html() {
            Some(html) => respond(StatusCode::OK, "text/html; charset=utf-8", html.into()),
            None => respond(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "syncmesh: Prometheus metrics at /metrics\n".into(),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try /metrics\n".into(),
        ),
    })
}

/// Binds `addr` and serves `endpoints` until the returned server is dropped.
pub async fn serve(addr: SocketAddr, endpoints: Arc<dyn Endpoints>) -> Result<MetricsServer> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Bind {
            addr: addr.to_string(),
            message: format!("{e}; is another process using it? change the metrics address"),
        })?;
    let bound = listener.local_addr().map_err(|e| Error::Bind {
        addr: addr.to_string(),
        message: e.to_string(),
    })?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(endpoints.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ =
                    tokio::time::timeout(Duration::from_millis(CONNECTION_DEADLINE_MS), conn).await;
                drop(permit);
            });
        }
    });
    tracing::info!(addr = %bound, "serving metrics at /metrics");
    Ok(MetricsServer { addr: bound, task })
}
