//! The API server: axum handlers over an [`Overlay`].

use super::guard::Access;
use super::types::{
    AddQuery, CidQuery, DiscoverBody, ErrorBody, FetchDone, FetchEvent, InvokeBody, InvokeReply,
    PinChange, PinView, RepoStat, SubmitBody, Submitted, job_id_text, parse_job_id,
};
use crate::market::jobs::{DEFAULT_JOB_WAIT, JobError};
use crate::market::{DiscoverError, DiscoverRequest, InvokeError, Market, ReserveTerms};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use flotilla_overlay::fetch::FetchProgress;
use flotilla_overlay::read::{ReadError, ReadLimits};
use flotilla_overlay::{Cid, Overlay, OverlayError};
use futures::{StreamExt, TryStreamExt};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::io::StreamReader;

/// How long `/v0/fetch` may run before it fails.
pub const FETCH_DEADLINE: Duration = Duration::from_secs(600);
/// How long `/v0/cat` may stream one file before it fails (the read is also bounded in
/// nodes visited and bytes, by [`ReadLimits`]).
pub const CAT_DEADLINE: Duration = Duration::from_secs(600);

/// How often `/v0/fetch` reports progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Clone)]
struct AppState {
    overlay: Overlay,
    market: Market,
    registry: Arc<Registry>,
}

/// The API's routes, answering whom `access` lets in.
pub fn router(overlay: Overlay, market: Market, registry: Arc<Registry>, access: Access) -> Router {
    Router::new()
        .route("/v0/status", get(status))
        .route("/v0/offers", get(offers))
        .route("/v0/discover", post(discover))
        .route("/v0/invoke", post(invoke))
        .route("/v0/jobs", post(submit))
        .route("/v0/jobs/{id}", get(job))
        .route("/v0/add", post(add))
        .route("/v0/fetch", post(fetch))
        .route("/v0/cat", get(cat))
        .route("/v0/pin/add", post(pin_add))
        .route("/v0/pin/rm", post(pin_rm))
        .route("/v0/pin/ls", get(pin_ls))
        .route("/v0/repo/gc", post(gc))
        .route("/v0/repo/stat", get(repo_stat))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(access),
            guard,
        ))
        .with_state(AppState {
            overlay,
            market,
            registry,
        })
}

/// Refuses what [`Access`] refuses (web pages, non-loopback hosts, a missing token).
async fn guard(
    State(access): State<Arc<Access>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some((status, why)) = access.refusal(request.headers()) {
        return ApiError(status, why.into()).into_response();
    }
    next.run(request).await
}

/// An error response: a status and a one-line message.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<OverlayError> for ApiError {
    fn from(e: OverlayError) -> Self {
        use flotilla_overlay::blockstore::StoreError;
        use flotilla_overlay::fetch::FetchError;
        let status = match e {
            OverlayError::Input(_) | OverlayError::Unixfs(_) => StatusCode::BAD_REQUEST,
            OverlayError::Missing(_) => StatusCode::NOT_FOUND,
            OverlayError::Read { .. } | OverlayError::Fetch(FetchError::TooManyBlocks { .. }) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            OverlayError::Store(StoreError::Full { .. }) => StatusCode::INSUFFICIENT_STORAGE,
            OverlayError::Store(StoreError::Closed) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

fn parse_cid(s: &str) -> Result<Cid, ApiError> {
    Cid::try_from(s)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid CID '{s}': {e}")))
}

async fn status(State(app): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(app.overlay.status().await?).into_response())
}

async fn add(
    State(app): State<AppState>,
    Query(q): Query<AddQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let lease = app.overlay.store().lease();
    let added = app
        .overlay
        .add_to(StreamReader::new(stream), &lease, q.pin)
        .await?;
    tracing::info!(cid = %added.cid, size = added.size, pinned = added.pinned, "added");
    Ok(Json(added).into_response())
}

async fn pin_add(
    State(app): State<AppState>,
    Query(q): Query<CidQuery>,
) -> Result<Response, ApiError> {
    let cid = parse_cid(&q.cid)?;
    let changed = match app.overlay.pin(cid).await {
        Ok(pin) => pin.is_some(),
        Err(OverlayError::Missing(block)) => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("cannot pin {cid}: block {block} is not held by this node; fetch it first"),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(%cid, changed, "pinned");
    Ok(Json(PinChange {
        cid: cid.to_string(),
        changed,
    })
    .into_response())
}

async fn pin_rm(
    State(app): State<AppState>,
    Query(q): Query<CidQuery>,
) -> Result<Response, ApiError> {
    let cid = parse_cid(&q.cid)?;
    let changed = app.overlay.unpin(cid).await?;
    tracing::info!(%cid, changed, "unpinned");
    Ok(Json(PinChange {
        cid: cid.to_string(),
        changed,
    })
    .into_response())
}

async fn pin_ls(State(app): State<AppState>) -> Result<Response, ApiError> {
    let pins: Vec<PinView> = app
        .overlay
        .pins()
        .await?
        .into_iter()
        .map(|p| PinView {
            cid: p.root.to_string(),
            pinned_at_ms: p.pinned_at_ms,
            bytes: p.bytes,
            blocks: p.blocks,
        })
        .collect();
    Ok(Json(pins).into_response())
}

async fn gc(State(app): State<AppState>) -> Result<Response, ApiError> {
    let report = app.overlay.gc().await?;
    tracing::info!(
        blocks = report.blocks,
        bytes = report.bytes,
        "garbage collected"
    );
    Ok(Json(report).into_response())
}

async fn repo_stat(State(app): State<AppState>) -> Result<Response, ApiError> {
    let pins = app.overlay.pins().await?.len() as u64;
    let store = app.overlay.store().blocking(|store| store.stats()).await;
    Ok(Json(RepoStat { store, pins }).into_response())
}

async fn cat(State(app): State<AppState>, Query(q): Query<CidQuery>) -> Result<Response, ApiError> {
    let cid = parse_cid(&q.cid)?;
    if !app.overlay.store().has(&cid) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("{cid} is not held by this node; fetch it first"),
        ));
    }
    let limits = ReadLimits::default().until(Instant::now() + CAT_DEADLINE);
    let mut file = Box::pin(app.overlay.read_file_within(cid, limits));
    // A file that fails before its first byte (a DAG bomb, say) is an error answer, not
    // an empty body cut short.
    let first = match file.next().await {
        Some(Err(e)) => return Err(e.into()),
        first => first,
    };
    let stream = futures::stream::iter(first)
        .chain(file)
        .map_err(std::io::Error::other);
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// A running fetch, reported as NDJSON lines; dropping it (the client went away) stops
/// the fetch.
struct FetchStream {
    task: Option<JoinHandle<Result<(), OverlayError>>>,
    progress: watch::Receiver<FetchProgress>,
    ticker: tokio::time::Interval,
    started: Instant,
}

impl Drop for FetchStream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn line(event: &FetchEvent) -> Bytes {
    let mut bytes = serde_json::to_vec(event).expect("events serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

async fn fetch(
    State(app): State<AppState>,
    Query(q): Query<CidQuery>,
) -> Result<Response, ApiError> {
    let cid = parse_cid(&q.cid)?;
    let (tx, rx) = watch::channel(FetchProgress::default());
    let overlay = app.overlay.clone();
    let task = tokio::spawn(async move {
        let lease = overlay.store().lease();
        match tokio::time::timeout(FETCH_DEADLINE, overlay.fetch(cid, &tx, &lease)).await {
            Ok(done) => done,
            Err(_) => Err(OverlayError::Read {
                root: cid,
                source: ReadError::DeadlinePassed,
            }),
        }
    });
    let state = FetchStream {
        task: Some(task),
        progress: rx,
        ticker: tokio::time::interval(PROGRESS_INTERVAL),
        started: Instant::now(),
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        let task = st.task.as_mut()?;
        let event = tokio::select! {
            joined = task => {
                st.task = None;
                match joined {
                    Ok(Ok(())) => FetchEvent::Done(FetchDone {
                        progress: *st.progress.borrow(),
                        seconds: st.started.elapsed().as_secs_f64(),
                    }),
                    Ok(Err(e)) => FetchEvent::Error(e.to_string()),
                    Err(e) => FetchEvent::Error(format!("fetch task failed: {e}")),
                }
            }
            _ = st.ticker.tick() => FetchEvent::Progress(*st.progress.borrow()),
        };
        Some((Ok::<_, std::convert::Infallible>(line(&event)), st))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn offers(State(app): State<AppState>) -> Response {
    Json(app.market.offers().await).into_response()
}

async fn discover(
    State(app): State<AppState>,
    Json(body): Json<DiscoverBody>,
) -> Result<Response, ApiError> {
    let tier = flotilla_overlay::regions::Tier::for_request(body.memory)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let memory_mib = u32::try_from(body.memory.div_ceil(1024 * 1024)).unwrap_or(tier.mib());
    let request = DiscoverRequest {
        memory_mib,
        max_tries: body.max_tries,
        reserve: body.reserve_ms.map(|hold_ms| ReserveTerms {
            reservation_id: rand::random::<u64>() >> 1,
            hold_ms,
            policy: body.placement,
        }),
    };
    match app.market.discover(request).await {
        Ok(discovered) => Ok(Json(discovered).into_response()),
        Err(e) => {
            let status = match e {
                DiscoverError::Request(_) => StatusCode::BAD_REQUEST,
                DiscoverError::NoScheduler => StatusCode::SERVICE_UNAVAILABLE,
                DiscoverError::Unanswered(_) => StatusCode::GATEWAY_TIMEOUT,
            };
            Err(ApiError(status, e.to_string()))
        }
    }
}

async fn invoke(
    State(app): State<AppState>,
    Json(body): Json<InvokeBody>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let replicas = body.replicas.unwrap_or(1);
    match app
        .market
        .invoke_replicated(
            body.call,
            body.max_tries,
            body.placement,
            replicas,
            body.fresh,
        )
        .await
    {
        Ok((invocation, replicas)) => Ok(Json(InvokeReply {
            invocation,
            total_us: started.elapsed().as_micros() as u64,
            replicas,
        })
        .into_response()),
        Err(e) => Err(invoke_error(e)),
    }
}

fn invoke_error(e: InvokeError) -> ApiError {
    let status = match e {
        InvokeError::Rejected(_) => StatusCode::BAD_REQUEST,
        InvokeError::Failed {
            retryable: false, ..
        } => StatusCode::UNPROCESSABLE_ENTITY,
        InvokeError::NoScheduler | InvokeError::Failed { .. } => StatusCode::SERVICE_UNAVAILABLE,
        InvokeError::Unanswered(_) => StatusCode::GATEWAY_TIMEOUT,
        InvokeError::BadReceipt(_) | InvokeError::NoMajority(_) => StatusCode::BAD_GATEWAY,
    };
    ApiError(status, e.to_string())
}

async fn submit(
    State(app): State<AppState>,
    Json(body): Json<SubmitBody>,
) -> Result<Response, ApiError> {
    let wait = body.wait_ms.map_or(DEFAULT_JOB_WAIT, Duration::from_millis);
    let invoke = body.invoke;
    if invoke.replicas.is_some_and(|n| n > 1) {
        let why = "a detached job runs on one volunteer (no --replicas)";
        return Err(ApiError(StatusCode::BAD_REQUEST, why.into()));
    }
    match app
        .market
        .submit(invoke.call, invoke.max_tries, invoke.placement, wait)
        .await
    {
        Ok(id) => Ok(Json(Submitted {
            job_id: job_id_text(id),
        })
        .into_response()),
        Err(JobError::Invoke(e)) => Err(invoke_error(e)),
        Err(e) => Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
    }
}

async fn job(
    State(app): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_job_id(&id).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    match app.market.job(id).await {
        Ok(record) => Ok(Json(record).into_response()),
        Err(e) => Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
    }
}

async fn metrics(State(app): State<AppState>) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &app.registry)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}
