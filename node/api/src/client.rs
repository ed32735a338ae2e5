//! The API client the CLI (and the research harness) uses to talk to a node.

use crate::job::JobRecord;
use crate::market::{Discovered, OffersView};
use crate::types::{
    DiscoverBody, ErrorBody, FetchDone, FetchEvent, InvokeBody, InvokeReply, PinChange, PinView,
    RepoStat, SubmitBody, Submitted,
};
use bytes::Bytes;
use flotilla_overlay::blockstore::GcReport;
use flotilla_overlay::fetch::FetchProgress;
use flotilla_overlay::{Added, Cid, OverlayStatus};
use futures::{Stream, StreamExt};
use std::net::SocketAddr;

/// Errors of talking to the node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers at the API address.
    #[error(
        "no Flotilla node answering at {0} (start one with `flotilla node`, or point --api / FLOTILLA_API at it)"
    )]
    NoNode(SocketAddr),
    /// The node answered with an error.
    #[error("{0}")]
    Node(String),
    /// The HTTP exchange failed.
    #[error("talking to the node at {addr}: {reason}")]
    Http {
        /// The API address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

/// A client of one node's API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: SocketAddr,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client of the node whose API is at `addr`.
    pub fn new(addr: SocketAddr) -> ApiClient {
        ApiClient {
            addr,
            http: reqwest::Client::new(),
        }
    }

    /// A client of the node whose API is at `addr`, sending `token` as a bearer token
    /// with every request when there is one (a node started with `--api-allow-remote`
    /// wants the one it wrote to its data dir).
    pub fn with_token(addr: SocketAddr, token: Option<String>) -> ApiClient {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(value) =
            token.and_then(|t| reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).ok())
        {
            let mut value = value;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        ApiClient {
            addr,
            http: reqwest::Client::builder()
                .default_headers(headers)
                .build()
                .unwrap_or_default(),
        }
    }

    /// The API address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn transport_error(&self, e: reqwest::Error) -> ClientError {
        if e.is_connect() {
            ClientError::NoNode(self.addr)
        } else {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = format!("{reason}: {s}");
                source = s.source();
            }
            ClientError::Http {
                addr: self.addr,
                reason,
            }
        }
    }

    async fn check(
        &self,
        response: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<reqwest::Response, ClientError> {
        let response = response.map_err(|e| self.transport_error(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or_else(|_| format!("{status}: {text}"));
        Err(ClientError::Node(message))
    }

    /// The node's status.
    pub async fn status(&self) -> Result<OverlayStatus, ClientError> {
        let response = self
            .check(self.http.get(self.url("/v0/status")).send().await)
            .await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// Adds a file from a stream of its bytes, pinned (kept until unpinned).
    pub async fn add<S>(&self, body: S) -> Result<Added, ClientError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static,
    {
        self.add_with(body, true).await
    }

    /// Adds a file from a stream of its bytes, pinned if `pin`, else as cache (kept while
    /// the store has room: a call's stdin, say).
    pub async fn add_with<S>(&self, body: S, pin: bool) -> Result<Added, ClientError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + Sync + 'static,
    {
        let request = self
            .http
            .post(self.url("/v0/add"))
            .query(&[("pin", pin)])
            .body(reqwest::Body::wrap_stream(body));
        let response = self.check(request.send().await).await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    async fn post_cid<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        cid: &Cid,
    ) -> Result<T, ClientError> {
        let request = self
            .http
            .post(self.url(path))
            .query(&[("cid", cid.to_string())]);
        let response = self.check(request.send().await).await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// Pins the DAG under `cid`, which the node must hold whole (fetch it first).
    pub async fn pin_add(&self, cid: &Cid) -> Result<PinChange, ClientError> {
        self.post_cid("/v0/pin/add", cid).await
    }

    /// Removes the pin on `cid`.
    pub async fn pin_rm(&self, cid: &Cid) -> Result<PinChange, ClientError> {
        self.post_cid("/v0/pin/rm", cid).await
    }

    /// Every pin.
    pub async fn pin_ls(&self) -> Result<Vec<PinView>, ClientError> {
        let response = self
            .check(self.http.get(self.url("/v0/pin/ls")).send().await)
            .await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// Removes every cached block not in use.
    pub async fn gc(&self) -> Result<GcReport, ClientError> {
        let response = self
            .check(self.http.post(self.url("/v0/repo/gc")).send().await)
            .await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// What the store holds, by state.
    pub async fn repo_stat(&self) -> Result<RepoStat, ClientError> {
        let response = self
            .check(self.http.get(self.url("/v0/repo/stat")).send().await)
            .await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// Has the node fetch the DAG under `cid`, calling `on_progress` as it goes.
    pub async fn fetch(
        &self,
        cid: &Cid,
        mut on_progress: impl FnMut(&FetchProgress),
    ) -> Result<FetchDone, ClientError> {
        let request = self
            .http
            .post(self.url("/v0/fetch"))
            .query(&[("cid", cid.to_string())]);
        let response = self.check(request.send().await).await?;
        let mut body = response.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk.map_err(|e| self.transport_error(e))?);
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let event: FetchEvent =
                    serde_json::from_slice(&line).map_err(|e| ClientError::Http {
                        addr: self.addr,
                        reason: format!("bad progress line: {e}"),
                    })?;
                match event {
                    FetchEvent::Progress(p) => on_progress(&p),
                    FetchEvent::Done(done) => {
                        on_progress(&done.progress);
                        return Ok(done);
                    }
                    FetchEvent::Error(message) => return Err(ClientError::Node(message)),
                }
            }
        }
        Err(ClientError::Http {
            addr: self.addr,
            reason: "the node ended the fetch without a result".into(),
        })
    }

    /// The bytes of the file under `cid`, which the node must hold.
    pub async fn cat(
        &self,
        cid: &Cid,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>> + use<>, ClientError> {
        let request = self
            .http
            .get(self.url("/v0/cat"))
            .query(&[("cid", cid.to_string())]);
        let response = self.check(request.send().await).await?;
        let this = self.clone();
        Ok(response
            .bytes_stream()
            .map(move |r| r.map_err(|e| this.transport_error(e))))
    }

    /// What the node offers, reserves and holds.
    pub async fn offers(&self) -> Result<OffersView, ClientError> {
        let response = self
            .check(self.http.get(self.url("/v0/offers")).send().await)
            .await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// Runs one discovery through a scheduler.
    pub async fn discover(&self, body: &DiscoverBody) -> Result<Discovered, ClientError> {
        let request = self.http.post(self.url("/v0/discover")).json(body);
        let response = self.check(request.send().await).await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// Runs a function on the network and waits for its answer.
    pub async fn invoke(&self, body: &InvokeBody) -> Result<InvokeReply, ClientError> {
        let request = self.http.post(self.url("/v0/invoke")).json(body);
        let response = self.check(request.send().await).await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// Submits a detached job; returns its id.
    pub async fn submit(&self, body: &SubmitBody) -> Result<Submitted, ClientError> {
        let request = self.http.post(self.url("/v0/jobs")).json(body);
        let response = self.check(request.send().await).await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// The newest record of a job.
    pub async fn job(&self, id: &str) -> Result<JobRecord, ClientError> {
        let request = self.http.get(self.url(&format!("/v0/jobs/{id}")));
        let response = self.check(request.send().await).await?;
        response.json().await.map_err(|e| self.transport_error(e))
    }

    /// The node's metrics in Prometheus text format.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let response = self
            .check(self.http.get(self.url("/metrics")).send().await)
            .await?;
        response.text().await.map_err(|e| self.transport_error(e))
    }
}
