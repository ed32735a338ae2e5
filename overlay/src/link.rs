//! Calls on streams kept open per peer ("links"), beside request-response.
//!
//! A request-response exchange opens a yamux stream for each request and passes
//! through the swarm's task on both sides, both ways. Calls are the hot path (a warm
//! call is two exchanges), so once a request on [`Concern::Calls`] has reached a peer
//! the long way, the requester opens one stream to it on [`PROTOCOL`] and sends its
//! later calls there: many requests in flight on one stream, each frame tagged with
//! its id, answers matched by id. The stream is read and written by the tasks that use
//! it, straight through `libp2p-stream` to the connection, never through the swarm.
//! Request-response stays the way to reach a peer (it dials, with addresses) and the
//! fallback whenever there is no link.
//!
//! Frames: a request is `id (u64) ‖ length (u32) ‖ bytes`; an answer is
//! `id (u64) ‖ status (u8) ‖ length (u32) ‖ bytes`, all big-endian. Everything a peer
//! can make us hold is bounded: a frame's length is checked before anything is
//! allocated ([`MAX_REQUEST_BYTES`], [`MAX_RESPONSE_BYTES`]); one link carries at most
//! [`Concern::max_streams`] requests at once (the reader waits for one to end before it
//! reads on, which pushes back through yamux's window); a peer keeps at most
//! [`LINKS_PER_PEER`] links to us, and [`MAX_LINKS`] in all; a link with nothing in
//! flight is closed after [`LinkConfig::idle`], and a frame must arrive whole within
//! [`LinkConfig::frame_timeout`] of its first byte. A request that finds the calls queue
//! full is answered at once with a refusal frame, so the requester does not wait out
//! its timeout.

use crate::fair::FairSender;
use crate::rpc::{Concern, InboundRequest, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Reply, RpcError};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};
use libp2p::{PeerId, StreamProtocol};
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;

/// The protocol links speak.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/flotilla/calls/link/1.0.0");
/// Links one peer may keep open to us at once (one, and one more while it replaces it).
pub const LINKS_PER_PEER: usize = 2;
/// Links open to us at once, from all peers.
pub const MAX_LINKS: usize = 1024;

/// An answer's status byte: the request's answer follows.
const ANSWERED: u8 = 0;
/// An answer's status byte: the request was not taken (the queue was full).
const REFUSED: u8 = 1;
/// An answer's status byte: the answer was over [`MAX_RESPONSE_BYTES`].
const TOO_LARGE: u8 = 2;
/// An answer's status byte, on the first frame (id [`u64::MAX`]): the link itself is
/// refused (too many open), and nothing on it is read.
const LINK_REFUSED: u8 = 3;
/// An answer's status byte, on the first frame (id [`u64::MAX`]): the link is taken.
/// The requester sends nothing on a link before this comes: a stream the peer dropped
/// unread (its acceptor was busy, or it does not speak links) never carries a request.
const LINK_ACCEPTED: u8 = 4;

/// The first frame on a link, from the answering side: `status` is [`LINK_ACCEPTED`]
/// or [`LINK_REFUSED`].
fn greeting(status: u8) -> Vec<u8> {
    let mut frame = u64::MAX.to_be_bytes().to_vec();
    frame.push(status);
    frame.extend_from_slice(&0u32.to_be_bytes());
    frame
}

/// A link's timings.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    /// A link with nothing in flight for this long is closed (by either side).
    pub idle: Duration,
    /// Longest time between a frame's first byte and its last.
    pub frame_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            idle: Duration::from_secs(30),
            frame_timeout: Duration::from_secs(10),
        }
    }
}

/// Reads a frame's body of `len` bytes, refusing one over `limit` before allocating.
async fn read_body<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: u32,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let len = len as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes, over {limit}"),
        ));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    Ok(body)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

/// A frame read: its id, status (always [`ANSWERED`] for a request) and body.
type Frame = (u64, u8, Vec<u8>);

/// One frame being read, with the reader handed back at the end: the read runs as a
/// future that is never cancelled half way (the caller polls it beside its idle timer).
type Reading = std::pin::Pin<Box<dyn Future<Output = (Reader, io::Result<Option<Frame>>)> + Send>>;

/// The reading half of a link's stream.
type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// The writing half of a link, shared by the tasks that send on it.
type Writer = Arc<FrameWriter>;

/// A link's stream cut in its two halves; each write is bounded by `timeout`.
fn halves<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    stream: S,
    timeout: Duration,
) -> (Reader, Writer) {
    let (reader, writer) = stream.split();
    let writer = FrameWriter {
        half: tokio::sync::Mutex::new(Box::new(writer)),
        timeout,
        broken: AtomicBool::new(false),
        breaking: Notify::new(),
        last_write: Mutex::new(tokio::time::Instant::now()),
    };
    (Box::new(reader), Arc::new(writer))
}

/// Reads an answer frame if `answer`, else a request frame, its body bounded by `limit`;
/// `None` at a clean end of the stream. Once its first byte has come, the rest of the
/// frame must follow within `frame_timeout`.
fn read_frame(mut reader: Reader, answer: bool, limit: usize, frame_timeout: Duration) -> Reading {
    async move {
        let result = async {
            let mut header = [0u8; 13];
            let header = if answer {
                &mut header[..]
            } else {
                &mut header[..12]
            };
            if reader.read(&mut header[..1]).await? == 0 {
                return Ok(None);
            }
            let rest = async {
                reader.read_exact(&mut header[1..]).await?;
                let (status, len) = if answer {
                    (header[8], u32_at(header, 9))
                } else {
                    (ANSWERED, u32_at(header, 8))
                };
                let body = read_body(&mut reader, len, limit).await?;
                Ok::<_, io::Error>((u64_at(header, 0), status, body))
            };
            match tokio::time::timeout(frame_timeout, rest).await {
                Ok(frame) => frame.map(Some),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "a frame arrived too slowly",
                )),
            }
        }
        .await;
        (reader, result)
    }
    .boxed()
}

/// The writing half of a link. A frame is written whole or the link is broken: a
/// write that fails, takes longer than `timeout` (a peer that does not read), or is
/// dropped half way would leave the next frame's bytes inside this one, so the link's
/// reader is told to close it ([`FrameWriter::broken`]), and nothing more is written.
struct FrameWriter {
    half: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    timeout: Duration,
    broken: AtomicBool,
    breaking: Notify,
    /// When a frame was last written whole.
    last_write: Mutex<tokio::time::Instant>,
}

/// Why a frame was not written.
#[derive(Debug)]
enum SendError {
    /// Not a byte of it: the link was broken, or busy with a stuck frame past the
    /// timeout.
    NotSent,
    /// Cut half way (the link is now broken).
    Cut(io::Error),
}

/// Breaks the link if dropped before [`Unbroken::done`]: a frame cut half way.
struct Unbroken<'a>(Option<&'a FrameWriter>);

impl Unbroken<'_> {
    fn done(mut self) {
        self.0 = None;
    }
}

impl Drop for Unbroken<'_> {
    fn drop(&mut self) {
        if let Some(writer) = self.0 {
            writer.broken.store(true, Ordering::Release);
            writer.breaking.notify_one();
        }
    }
}

impl FrameWriter {
    /// Writes `frame` whole: waits at most the timeout for the link (another frame
    /// being written), then at most the timeout for the frame to go.
    async fn send(&self, frame: Vec<u8>) -> Result<(), SendError> {
        let Ok(mut half) = tokio::time::timeout(self.timeout, self.half.lock()).await else {
            return Err(SendError::NotSent);
        };
        // Checked under the lock: a frame cut half way broke the link while it held
        // the lock, so nothing is ever written after a partial frame.
        if self.is_broken() {
            return Err(SendError::NotSent);
        }
        let write = async {
            // From the first byte on, stopping half way breaks the link.
            let mut unbroken = Unbroken(None);
            let mut written = 0;
            while written < frame.len() {
                match half.write(&frame[written..]).await {
                    Ok(0) | Err(_) if written == 0 => return Err(SendError::NotSent),
                    Ok(0) => return Err(SendError::Cut(io::ErrorKind::WriteZero.into())),
                    Ok(n) => {
                        written += n;
                        unbroken.0 = Some(self);
                    }
                    Err(e) => return Err(SendError::Cut(e)),
                }
            }
            half.flush().await.map_err(SendError::Cut)?;
            unbroken.done();
            *self.last_write.lock().unwrap_or_else(|e| e.into_inner()) =
                tokio::time::Instant::now();
            Ok(())
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(sent) => sent,
            // Timed out half way (the guard broke the link) or before the first byte.
            Err(_) if self.is_broken() => Err(SendError::Cut(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer does not read",
            ))),
            Err(_) => Err(SendError::NotSent),
        }
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Resolves once a frame was cut half way: the link must close.
    async fn broken(&self) {
        if !self.is_broken() {
            self.breaking.notified().await;
        }
    }

    fn last_write(&self) -> tokio::time::Instant {
        *self.last_write.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flushes the writing half (a lazily negotiated stream sends its protocol's name),
    /// within the timeout.
    async fn flush(&self) {
        let flush = async { self.half.lock().await.flush().await };
        let _ = tokio::time::timeout(self.timeout, flush).await;
    }

    /// Closes the writing half, within the timeout.
    async fn close(&self) {
        let close = async { self.half.lock().await.close().await };
        let _ = tokio::time::timeout(self.timeout, close).await;
    }
}

/// `now + after`, or far in the future if that overflows.
fn later(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Where an answer to a request that came on a link goes.
pub(crate) struct Responder {
    id: u64,
    writer: Writer,
    /// The request's place among its peer's requests in flight, given back once
    /// answered.
    permit: OwnedSemaphorePermit,
    /// Held until answered: the link is not idle while any is held.
    busy: Arc<()>,
}

impl Responder {
    /// Writes the answer, without waiting for the peer: a frame that cannot go at once
    /// goes on in a task of its own (bounded by the link's write timeout), so a peer
    /// that reads nothing never holds up whoever answers. A link that has closed is
    /// not an error: the requester has gone.
    pub(crate) fn answer(self, bytes: Vec<u8>) {
        if bytes.len() > MAX_RESPONSE_BYTES {
            return self.write(TOO_LARGE, Vec::new());
        }
        self.write(ANSWERED, bytes);
    }

    pub(crate) fn refuse(self) {
        self.write(REFUSED, Vec::new());
    }

    fn write(self, status: u8, body: Vec<u8>) {
        let mut frame = Vec::with_capacity(13 + body.len());
        frame.extend_from_slice(&self.id.to_be_bytes());
        frame.push(status);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        let Responder {
            writer,
            permit,
            busy,
            ..
        } = self;
        let mut sending = async move {
            let _ = writer.send(frame).await;
            drop((permit, busy));
        }
        .boxed();
        // Most answers go at once, on the answering task: no hand-off.
        if (&mut sending).now_or_never().is_none() {
            tokio::spawn(sending);
        }
    }
}

/// Requests one peer may have in flight on its links to us, all of them together: one
/// peer cannot take the whole calls queue through its links.
pub const IN_FLIGHT_PER_PEER: usize = 64;

/// The links peers have open to us, and their places for requests in flight.
#[derive(Default)]
struct Served {
    /// Per peer: links open, and the places its requests share.
    peers: HashMap<PeerId, (usize, Arc<Semaphore>)>,
    links: usize,
}

/// Serves the links other peers open to us: every request read goes into `queue` (the
/// calls' inbound queue, the one request-response fills), counted in `received`. Runs
/// until aborted; aborting it closes every link it serves.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    mut incoming: impl futures::Stream<Item = (PeerId, S)> + Unpin,
    queue: FairSender<InboundRequest>,
    received: Counter,
    config: LinkConfig,
) {
    use futures::StreamExt;
    let served: Arc<Mutex<Served>> = Arc::default();
    fn lock(served: &Mutex<Served>) -> std::sync::MutexGuard<'_, Served> {
        served.lock().unwrap_or_else(|e| e.into_inner())
    }
    let mut links = JoinSet::new();
    let mut refusing = JoinSet::new();
    loop {
        tokio::select! {
            next = incoming.next() => {
                let Some((peer, stream)) = next else { break };
                let places = {
                    let mut served = lock(&served);
                    // A peer with no link open keeps its places while its requests
                    // are in flight (each holds the semaphore): closing its links and
                    // opening others does not give it more.
                    served
                        .peers
                        .retain(|_, (n, places)| *n > 0 || Arc::strong_count(places) > 1);
                    let full = served.links >= MAX_LINKS;
                    let entry = served
                        .peers
                        .entry(peer)
                        .or_insert_with(|| (0, Arc::new(Semaphore::new(IN_FLIGHT_PER_PEER))));
                    if entry.0 >= LINKS_PER_PEER || full {
                        None
                    } else {
                        entry.0 += 1;
                        let places = entry.1.clone();
                        served.links += 1;
                        Some(places)
                    }
                };
                let Some(places) = places else {
                    tracing::debug!(%peer, "link refused: too many open");
                    // Told so (briefly: at most a second), so the requester sends what
                    // it wrote on it the long way; while as many refusals are being
                    // told as links may be open, the rest are just dropped.
                    if refusing.len() < MAX_LINKS {
                        refusing.spawn(refuse_link(stream));
                    }
                    continue;
                };
                tracing::trace!(%peer, "link opened");
                let served = served.clone();
                let queue = queue.clone();
                let received = received.clone();
                links.spawn(async move {
                    serve_link(peer, stream, queue, received, places, config).await;
                    let mut served = lock(&served);
                    served.links -= 1;
                    if let Some((n, _)) = served.peers.get_mut(&peer) {
                        *n -= 1;
                    }
                });
            }
            Some(_) = links.join_next(), if !links.is_empty() => {}
            Some(_) = refusing.join_next(), if !refusing.is_empty() => {}
        }
    }
}

/// Tells the requester its link is refused (a frame of id `u64::MAX`), within a second,
/// and closes it.
async fn refuse_link<S: AsyncWrite + Unpin>(mut stream: S) {
    let frame = greeting(LINK_REFUSED);
    let tell = async {
        stream.write_all(&frame).await?;
        stream.close().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), tell).await;
}

/// Reads `peer`'s requests on one link until it closes, errs, or idles; `places` are
/// the peer's requests in flight, shared by its links.
async fn serve_link<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
    peer: PeerId,
    stream: S,
    queue: FairSender<InboundRequest>,
    received: Counter,
    places: Arc<Semaphore>,
    config: LinkConfig,
) {
    let (reader, writer) = halves(stream, config.frame_timeout);
    if writer.send(greeting(LINK_ACCEPTED)).await.is_err() {
        return;
    }
    let mut reading = read_frame(reader, false, MAX_REQUEST_BYTES, config.frame_timeout);
    // Twice the requester's idle time, counted from the last request or answer: a
    // requester closes an idle link first, so a request it sends never meets our
    // closing.
    let idle_for = config.idle.saturating_mul(2);
    let mut last_request = tokio::time::Instant::now();
    let busy = Arc::new(());
    let idle = tokio::time::sleep(idle_for);
    tokio::pin!(idle);
    loop {
        let (reader, frame) = tokio::select! {
            read = &mut reading => read,
            () = writer.broken() => {
                tracing::debug!(%peer, "link closed: an answer was cut short");
                break;
            }
            () = &mut idle => {
                if Arc::strong_count(&busy) > 1 {
                    // A call under way: looked at again an idle period from now.
                    idle.as_mut().reset(later(idle_for));
                    continue;
                }
                let last = last_request.max(writer.last_write());
                if last.elapsed() >= idle_for {
                    tracing::debug!(%peer, "idle link closed");
                    break;
                }
                let next = last.checked_add(idle_for).unwrap_or_else(|| later(idle_for));
                idle.as_mut().reset(next);
                continue;
            }
        };
        let (id, bytes) = match frame {
            Ok(Some((id, _, bytes))) => (id, bytes),
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "link closed");
                break;
            }
        };
        received.inc();
        last_request = tokio::time::Instant::now();
        // The reader waits for a place before reading on: at most
        // `IN_FLIGHT_PER_PEER` requests of the peer's are in flight.
        let permit = tokio::select! {
            permit = places.clone().acquire_owned() => permit,
            () = writer.broken() => break,
        };
        let Ok(permit) = permit else {
            break;
        };
        let responder = Responder {
            id,
            writer: writer.clone(),
            permit,
            busy: busy.clone(),
        };
        let request = InboundRequest {
            peer,
            concern: Concern::Calls,
            bytes,
            reply: Reply::Link(responder),
        };
        crate::rpc::enqueue(&queue, request);
        idle.as_mut().reset(later(idle_for));
        reading = read_frame(reader, false, MAX_REQUEST_BYTES, config.frame_timeout);
    }
    writer.close().await;
}

/// Requests waiting for their answers on one link, by id.
#[derive(Default)]
struct Pending {
    /// Each one's answer, or why there is none.
    waiting: HashMap<u64, oneshot::Sender<Result<Vec<u8>, RpcError>>>,
    /// Set once the link has failed: nothing more is sent on it.
    closed: bool,
}

/// One link we opened to a peer.
struct Link {
    peer: PeerId,
    writer: Writer,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    /// Requests in flight, at most [`IN_FLIGHT_PER_PEER`] (what the peer takes from
    /// us): beyond, requests go the long way.
    places: Arc<Semaphore>,
}

impl Link {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails every request waiting on this link (each was sent, and may be under way:
    /// none is sent again) and refuses new ones.
    fn fail_all(&self, reason: &str) {
        let waiting = {
            let mut pending = self.pending();
            pending.closed = true;
            std::mem::take(&mut pending.waiting)
        };
        for (_, reply) in waiting {
            let _ = reply.send(Err(RpcError::Failed {
                peer: self.peer,
                reason: format!("link: {reason}"),
            }));
        }
    }
}

/// The links this node opened to others, and the requests it sends on them.
#[derive(Clone)]
pub struct Links {
    control: libp2p_stream::Control,
    config: LinkConfig,
    links: Arc<Mutex<HashMap<PeerId, Slot>>>,
    /// Peers that refused links (or did not open one in time), and until when no link
    /// is opened to them again; at most [`MAX_NO_LINK`] remembered.
    no_link: Arc<Mutex<HashMap<PeerId, tokio::time::Instant>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

/// How long a peer that refused links is asked the long way only.
pub const NO_LINK_FOR: Duration = Duration::from_secs(600);
/// How long a peer that did not open a link in time, or had too many open, is asked the
/// long way only.
pub const NO_LINK_AFTER_TIMEOUT: Duration = Duration::from_secs(60);
/// Peers remembered as not answering on links, at most.
const MAX_NO_LINK: usize = 4096;

#[derive(Clone)]
enum Slot {
    Opening,
    Open(Arc<Link>),
}

/// Removes a request's entry if it is dropped (timed out) before its answer came.
struct Waiting<'a> {
    link: &'a Link,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.link.pending().waiting.remove(&self.id);
    }
}

impl Links {
    /// Links opened with `control`.
    pub fn new(control: libp2p_stream::Control, config: LinkConfig) -> Links {
        Links {
            control,
            config,
            links: Arc::default(),
            no_link: Arc::default(),
            tasks: Arc::default(),
        }
    }

    fn no_link(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, tokio::time::Instant>> {
        self.no_link.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Slot>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a link to `peer` is open.
    pub fn is_open(&self, peer: &PeerId) -> bool {
        matches!(self.slots().get(peer), Some(Slot::Open(_)))
    }

    /// Sends `bytes` to `peer` on its link and waits for the answer. `None` when there
    /// is no open link to `peer` (nothing was sent: the caller sends it the long way).
    pub async fn request(&self, peer: PeerId, bytes: &[u8]) -> Option<Result<Vec<u8>, RpcError>> {
        if bytes.len() > MAX_REQUEST_BYTES {
            return None;
        }
        let link = match self.slots().get(&peer) {
            Some(Slot::Open(link)) => link.clone(),
            _ => return None,
        };
        let Ok(_place) = link.places.clone().try_acquire_owned() else {
            return None;
        };
        let id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = link.pending();
            if pending.closed {
                return None;
            }
            pending.waiting.insert(id, reply);
        }
        let waiting = Waiting { link: &link, id };
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(&id.to_be_bytes());
        header[8..].copy_from_slice(&(bytes.len() as u32).to_be_bytes());
        let mut frame = Vec::with_capacity(header.len() + bytes.len());
        frame.extend_from_slice(&header);
        frame.extend_from_slice(bytes);
        match link.writer.send(frame).await {
            Ok(()) => {}
            // Not a byte went: the caller sends it the long way.
            Err(SendError::NotSent) => return None,
            // Cut half way, the link is broken (its reader fails what waits on it).
            Err(SendError::Cut(e)) => {
                return Some(Err(RpcError::Failed {
                    peer,
                    reason: format!("link: {e}"),
                }));
            }
        }
        let outcome = answer.await;
        drop(waiting);
        Some(outcome.unwrap_or(Err(RpcError::Stopped)))
    }

    /// Opens a link to `peer` in the background, unless one is open or opening. Call it
    /// once a request reached `peer` the long way (so a connection is there to open it
    /// on).
    pub fn open(&self, peer: PeerId) {
        if let Some(until) = self.no_link().get(&peer)
            && *until > tokio::time::Instant::now()
        {
            return;
        }
        {
            let mut slots = self.slots();
            if slots.contains_key(&peer) {
                return;
            }
            slots.insert(peer, Slot::Opening);
        }
        let links = self.clone();
        let mut control = self.control.clone();
        self.spawn(async move {
            let opened = tokio::time::timeout(
                links.config.frame_timeout,
                control.open_stream(peer, PROTOCOL),
            )
            .await;
            match opened {
                Ok(Ok(stream)) => links.attach(peer, stream).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "no link opened");
                    links.slots().remove(&peer);
                    let refused =
                        matches!(e, libp2p_stream::OpenStreamError::UnsupportedProtocol(_));
                    if refused {
                        links.remember_no_link(peer, NO_LINK_FOR);
                    }
                }
                Err(_) => {
                    links.slots().remove(&peer);
                    links.remember_no_link(peer, NO_LINK_AFTER_TIMEOUT);
                }
            }
        });
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        // Finished tasks are reaped here, so the set stays as large as the links open.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(task);
    }

    /// Makes `stream` the link to `peer` once the peer has taken it, and reads its
    /// answers until it closes.
    async fn attach<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        &self,
        peer: PeerId,
        stream: S,
    ) {
        let (reader, writer) = halves(stream, self.config.frame_timeout);
        // Its first frame says whether the peer took the link; nothing is sent before
        // (but the protocol's name, which a lazily negotiated stream sends on a flush).
        writer.flush().await;
        let first = read_frame(reader, true, 0, self.config.frame_timeout);
        // Taken: the reader; not taken: for how long to ask the peer the long way only.
        let taken: Result<Reader, Option<Duration>> =
            match tokio::time::timeout(self.config.frame_timeout, first).await {
                Ok((reader, Ok(Some((u64::MAX, LINK_ACCEPTED, _))))) => Ok(reader),
                Ok((_, Ok(Some((u64::MAX, LINK_REFUSED, _))))) => Err(Some(NO_LINK_AFTER_TIMEOUT)),
                // An older node refuses the protocol for good.
                Ok((_, Err(e))) if crate::rpc::refused_protocol(&e) => Err(Some(NO_LINK_FOR)),
                // Dropped unread (its acceptor was busy) or nonsense: tried again later.
                Ok(_) => Err(None),
                Err(_) => Err(Some(NO_LINK_AFTER_TIMEOUT)),
            };
        let reader = match taken {
            Ok(reader) => reader,
            Err(refused) => {
                tracing::debug!(%peer, "link not taken");
                self.slots().remove(&peer);
                if let Some(how_long) = refused {
                    self.remember_no_link(peer, how_long);
                }
                writer.close().await;
                return;
            }
        };
        let link = Arc::new(Link {
            peer,
            writer,
            pending: Mutex::default(),
            next_id: AtomicU64::new(0),
            places: Arc::new(Semaphore::new(IN_FLIGHT_PER_PEER)),
        });
        self.slots().insert(peer, Slot::Open(link.clone()));
        self.read_answers(link, reader).await;
    }

    /// Takes `link` out of the table, if it is still the one there.
    fn forget(&self, link: &Arc<Link>) {
        let mut slots = self.slots();
        if let Some(Slot::Open(current)) = slots.get(&link.peer)
            && Arc::ptr_eq(current, link)
        {
            slots.remove(&link.peer);
        }
    }

    /// Hands each answer on `link` to its request, until the link fails or idles.
    async fn read_answers(&self, link: Arc<Link>, reader: Reader) {
        let config = self.config;
        let mut reading = read_frame(reader, true, MAX_RESPONSE_BYTES, config.frame_timeout);
        let idle = tokio::time::sleep(config.idle);
        tokio::pin!(idle);
        let reason = loop {
            let (reader, frame) = tokio::select! {
                read = &mut reading => read,
                () = link.writer.broken() => break "a request was cut short".to_string(),
                () = &mut idle => {
                    let quiet = {
                        let mut pending = link.pending();
                        let quiet = pending.waiting.is_empty();
                        if quiet {
                            pending.closed = true;
                        }
                        quiet
                    };
                    if quiet {
                        break "idle".to_string();
                    }
                    idle.as_mut().reset(later(config.idle));
                    continue;
                }
            };
            match frame {
                Ok(Some((id, status, body))) => {
                    let reply = link.pending().waiting.remove(&id);
                    // Only an answer someone waits for keeps the link from idling.
                    if let Some(reply) = reply {
                        let refusal = |reason: &str| RpcError::Failed {
                            peer: link.peer,
                            reason: reason.to_string(),
                        };
                        let answer = match status {
                            ANSWERED => Ok(body),
                            TOO_LARGE => Err(refusal("its answer was over 512 KiB")),
                            _ => Err(refusal("busy: its queue of calls is full")),
                        };
                        let _ = reply.send(answer);
                        idle.as_mut().reset(later(config.idle));
                    }
                }
                Ok(None) => break "closed by the peer".to_string(),
                Err(e) => break e.to_string(),
            }
            reading = read_frame(reader, true, MAX_RESPONSE_BYTES, config.frame_timeout);
        };
        tracing::debug!(peer = %link.peer, %reason, "link closed");
        self.forget(&link);
        link.fail_all(&reason);
        link.writer.close().await;
    }

    /// Opens no link to `peer` for `how_long`.
    fn remember_no_link(&self, peer: PeerId, how_long: Duration) {
        let now = tokio::time::Instant::now();
        let mut no_link = self.no_link();
        if no_link.len() >= MAX_NO_LINK {
            no_link.retain(|_, until| *until > now);
        }
        if no_link.len() < MAX_NO_LINK {
            no_link.insert(peer, later(how_long));
        }
    }

    /// Closes every link (the node is stopping).
    pub fn close_all(&self) {
        let open: Vec<Arc<Link>> = self
            .slots()
            .values()
            .filter_map(|slot| match slot {
                Slot::Open(link) => Some(link.clone()),
                Slot::Opening => None,
            })
            .collect();
        for link in open {
            link.fail_all("this node is stopping");
        }
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_all();
        self.slots().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    fn request_frame(id: u64, body: &[u8]) -> Vec<u8> {
        let mut frame = id.to_be_bytes().to_vec();
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(body);
        frame
    }

    fn reader(bytes: Vec<u8>) -> Reader {
        Box::new(futures::io::Cursor::new(bytes))
    }

    /// Yields its bytes one poll at a time, then never anything more (and never wakes).
    struct Stall(Vec<u8>);

    impl AsyncRead for Stall {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            if self.0.is_empty() || buf.is_empty() {
                return Poll::Pending;
            }
            buf[0] = self.0.remove(0);
            Poll::Ready(Ok(1))
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn frames_are_read_whole_and_a_clean_end_is_no_frame() {
        let mut bytes = request_frame(7, b"hello");
        bytes.extend(request_frame(8, b""));
        let (rest, frame) = read_frame(reader(bytes), false, 64, SECOND).await;
        assert_eq!(frame.unwrap(), Some((7, ANSWERED, b"hello".to_vec())));
        let (rest, frame) = read_frame(rest, false, 64, SECOND).await;
        assert_eq!(frame.unwrap(), Some((8, ANSWERED, Vec::new())));
        let (_, frame) = read_frame(rest, false, 64, SECOND).await;
        assert_eq!(frame.unwrap(), None);
        // An answer frame carries its status.
        let mut answer = 9u64.to_be_bytes().to_vec();
        answer.push(REFUSED);
        answer.extend_from_slice(&0u32.to_be_bytes());
        let (_, frame) = read_frame(reader(answer), true, 64, SECOND).await;
        assert_eq!(frame.unwrap(), Some((9, REFUSED, Vec::new())));
    }

    #[tokio::test]
    async fn a_frame_over_its_bound_is_refused_before_its_body_is_read() {
        // A header claiming 4 GiB and no body: refused on the header alone.
        let mut header = 1u64.to_be_bytes().to_vec();
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        let (_, frame) = read_frame(reader(header), false, MAX_REQUEST_BYTES, SECOND).await;
        assert_eq!(frame.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let over = request_frame(1, &[0; 65]);
        let (_, frame) = read_frame(reader(over), false, 64, SECOND).await;
        assert_eq!(frame.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test(start_paused = true)]
    async fn a_frame_that_stops_half_way_times_out() {
        let started = tokio::time::Instant::now();
        let half = request_frame(1, b"hello")[..10].to_vec();
        let (_, frame) = read_frame(Box::new(Stall(half)), false, 64, 10 * SECOND).await;
        assert_eq!(frame.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), 10 * SECOND);
    }

    /// A link served on one end of an in-memory pipe; the other end is returned.
    fn served(
        queue: FairSender<InboundRequest>,
        config: LinkConfig,
    ) -> (tokio_util::compat::Compat<tokio::io::DuplexStream>, Counter) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let received = Counter::default();
        let counted = received.clone();
        tokio::spawn(async move {
            let places = Arc::new(Semaphore::new(IN_FLIGHT_PER_PEER));
            serve_link(
                PeerId::random(),
                theirs.compat(),
                queue,
                counted,
                places,
                config,
            )
            .await;
        });
        (ours.compat(), received)
    }

    /// A link served on one end of a pipe, its greeting read off the other end.
    async fn served_and_greeted(
        queue: FairSender<InboundRequest>,
        config: LinkConfig,
    ) -> (tokio_util::compat::Compat<tokio::io::DuplexStream>, Counter) {
        let (mut client, received) = served(queue, config);
        assert_eq!(
            read_answer(&mut client).await,
            (u64::MAX, LINK_ACCEPTED, Vec::new())
        );
        (client, received)
    }

    async fn read_answer<R: AsyncRead + Unpin>(r: &mut R) -> (u64, u8, Vec<u8>) {
        let mut header = [0u8; 13];
        r.read_exact(&mut header).await.unwrap();
        let mut body = vec![0u8; u32_at(&header, 9) as usize];
        r.read_exact(&mut body).await.unwrap();
        (u64_at(&header, 0), header[8], body)
    }

    /// Links whose one link, to a random peer, is an in-memory pipe: the other end,
    /// for the test to play the peer, is returned.
    async fn linked(
        config: LinkConfig,
    ) -> (
        Links,
        PeerId,
        tokio_util::compat::Compat<tokio::io::DuplexStream>,
    ) {
        let control = libp2p_stream::Behaviour::new().new_control();
        let links = Links::new(control, config);
        let peer = PeerId::random();
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let mut theirs = theirs.compat();
        theirs.write_all(&greeting(LINK_ACCEPTED)).await.unwrap();
        let attaching = links.clone();
        links.spawn(async move { attaching.attach(peer, ours.compat()).await });
        while !links.is_open(&peer) {
            tokio::task::yield_now().await;
        }
        (links, peer, theirs)
    }

    /// Sends `bytes` to `peer` on its link, in a task of its own.
    fn ask(
        links: &Links,
        peer: PeerId,
        bytes: &'static [u8],
    ) -> tokio::task::JoinHandle<Option<Result<Vec<u8>, RpcError>>> {
        let links = links.clone();
        tokio::spawn(async move { links.request(peer, bytes).await })
    }

    /// Reads a request frame off the peer's end.
    async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> (u64, Vec<u8>) {
        let mut header = [0u8; 12];
        r.read_exact(&mut header).await.unwrap();
        let mut body = vec![0u8; u32_at(&header, 8) as usize];
        r.read_exact(&mut body).await.unwrap();
        (u64_at(&header, 0), body)
    }

    fn answer_frame(id: u64, status: u8, body: &[u8]) -> Vec<u8> {
        let mut frame = id.to_be_bytes().to_vec();
        frame.push(status);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(body);
        frame
    }

    /// The far end of a stream whose peer refused its protocol (an older node): writes
    /// vanish, and reading fails as multistream-select's "no".
    struct Refusing;

    impl AsyncRead for Refusing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let refusal = libp2p::core::upgrade::NegotiationError::Failed;
            Poll::Ready(Err(io::Error::other(refusal)))
        }
    }

    impl AsyncWrite for Refusing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn fresh_links() -> Links {
        Links::new(
            libp2p_stream::Behaviour::new().new_control(),
            LinkConfig::default(),
        )
    }

    #[tokio::test]
    async fn a_link_whose_protocol_the_peer_refuses_is_never_used_nor_tried_again() {
        let links = fresh_links();
        let peer = PeerId::random();
        links.slots().insert(peer, Slot::Opening);
        links.attach(peer, Refusing).await;
        assert!(!links.is_open(&peer));
        assert!(
            links.request(peer, b"hello").await.is_none(),
            "sent the long way"
        );
        let until = *links.no_link().get(&peer).expect("remembered");
        assert!(until > later(NO_LINK_FOR - SECOND));
        links.open(peer);
        assert!(links.slots().get(&peer).is_none(), "no new link is tried");
    }

    #[tokio::test]
    async fn a_link_refused_for_too_many_open_is_never_used_and_tried_again_later() {
        let links = fresh_links();
        let peer = PeerId::random();
        let (ours, theirs) = tokio::io::duplex(1 << 10);
        let mut theirs = theirs.compat();
        theirs.write_all(&greeting(LINK_REFUSED)).await.unwrap();
        links.attach(peer, ours.compat()).await;
        assert!(!links.is_open(&peer));
        let until = *links.no_link().get(&peer).expect("remembered");
        assert!(until <= later(NO_LINK_AFTER_TIMEOUT));
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_sent_on_a_link_before_the_peer_takes_it() {
        let links = fresh_links();
        let peer = PeerId::random();
        // A peer that dropped the stream unread, or is slow: no greeting comes.
        let (ours, theirs) = tokio::io::duplex(1 << 10);
        let attaching = links.clone();
        let attached = tokio::spawn(async move { attaching.attach(peer, ours.compat()).await });
        tokio::task::yield_now().await;
        assert!(
            links.request(peer, b"hello").await.is_none(),
            "sent the long way"
        );
        attached.await.unwrap();
        assert!(!links.is_open(&peer));
        let mut theirs = theirs.compat();
        let mut sent = Vec::new();
        theirs.read_to_end(&mut sent).await.unwrap();
        assert!(sent.is_empty(), "not a byte was sent: {sent:?}");
    }

    #[tokio::test]
    async fn a_link_that_answered_then_failed_fails_what_waits_on_it() {
        let (links, peer, mut theirs) = linked(LinkConfig::default()).await;
        let first = ask(&links, peer, b"one");
        let (id, _) = read_request(&mut theirs).await;
        // An answer to no request is ignored; the real one is taken.
        theirs
            .write_all(&answer_frame(99, ANSWERED, b"stray"))
            .await
            .unwrap();
        theirs
            .write_all(&answer_frame(id, ANSWERED, b"eno"))
            .await
            .unwrap();
        assert_eq!(first.await.unwrap().unwrap().unwrap(), b"eno");
        let second = ask(&links, peer, b"two");
        let (id, _) = read_request(&mut theirs).await;
        assert_eq!(id, 1);
        drop(theirs);
        // Sent, perhaps taken (a call may be running): not sent again, but failed.
        let failed = second.await.unwrap().expect("answered on the link");
        assert!(matches!(failed, Err(RpcError::Failed { .. })), "{failed:?}");
        // A later call goes the long way, and a link may be opened again.
        assert!(links.request(peer, b"three").await.is_none());
        assert!(links.no_link().get(&peer).is_none());
    }

    #[tokio::test]
    async fn a_link_closed_before_any_answer_fails_its_request_rather_than_send_it_twice() {
        let (links, peer, mut theirs) = linked(LinkConfig::default()).await;
        let asking = ask(&links, peer, b"hello");
        assert_eq!(read_request(&mut theirs).await, (0, b"hello".to_vec()));
        // The peer read the request (it may be running it) and the link went down.
        drop(theirs);
        let failed = asking.await.unwrap().expect("not sent again");
        assert!(matches!(failed, Err(RpcError::Failed { .. })), "{failed:?}");
    }

    #[tokio::test]
    async fn a_refusal_on_a_link_is_an_error_at_once() {
        let (links, peer, mut theirs) = linked(LinkConfig::default()).await;
        let asking = ask(&links, peer, b"x");
        let (id, _) = read_request(&mut theirs).await;
        theirs
            .write_all(&answer_frame(id, REFUSED, b""))
            .await
            .unwrap();
        let refused = asking.await.unwrap().unwrap();
        assert!(
            matches!(refused, Err(RpcError::Failed { .. })),
            "{refused:?}"
        );
        assert!(links.is_open(&peer), "a refusal keeps the link");
    }

    #[tokio::test(start_paused = true)]
    async fn stray_answers_do_not_keep_an_idle_link_open() {
        let config = LinkConfig {
            idle: 30 * SECOND,
            frame_timeout: SECOND,
        };
        let (links, peer, mut theirs) = linked(config).await;
        let started = tokio::time::Instant::now();
        // A peer sending answers to nothing every 10 s.
        while links.is_open(&peer) {
            assert!(
                started.elapsed() < 60 * SECOND,
                "the link outlived its idle time"
            );
            let _ = theirs.write_all(&answer_frame(7, ANSWERED, b"junk")).await;
            tokio::time::sleep(10 * SECOND).await;
        }
    }

    #[tokio::test]
    async fn answers_go_back_on_the_link_by_id_in_any_order() {
        let (queue, mut requests) = crate::fair::fair_queue(8, 8);
        let (mut client, received) = served_and_greeted(queue, LinkConfig::default()).await;
        for (id, body) in [(5u64, b"five"), (6, b"six_"), (7, b"seve")] {
            client.write_all(&request_frame(id, body)).await.unwrap();
        }
        let mut taken = Vec::new();
        for _ in 0..3 {
            taken.push(requests.recv().await.unwrap());
        }
        assert_eq!(received.get(), 3);
        // Answered last first.
        for request in taken.into_iter().rev() {
            let mut answer = request.bytes.clone();
            answer.reverse();
            request.respond(answer).await.unwrap();
        }
        assert_eq!(
            read_answer(&mut client).await,
            (7, ANSWERED, b"eves".to_vec())
        );
        assert_eq!(
            read_answer(&mut client).await,
            (6, ANSWERED, b"_xis".to_vec())
        );
        assert_eq!(
            read_answer(&mut client).await,
            (5, ANSWERED, b"evif".to_vec())
        );
    }

    #[tokio::test]
    async fn a_request_that_finds_the_queue_full_is_refused_at_once() {
        // Room for one request, and nobody taking it.
        let (queue, _requests) = crate::fair::fair_queue(1, 1);
        let (mut client, _) = served_and_greeted(queue, LinkConfig::default()).await;
        client.write_all(&request_frame(1, b"a")).await.unwrap();
        client.write_all(&request_frame(2, b"b")).await.unwrap();
        assert_eq!(read_answer(&mut client).await, (2, REFUSED, Vec::new()));
    }

    #[tokio::test]
    async fn an_oversize_request_closes_its_link() {
        let (queue, _requests) = crate::fair::fair_queue(8, 8);
        let (mut client, received) = served_and_greeted(queue, LinkConfig::default()).await;
        let mut header = 1u64.to_be_bytes().to_vec();
        header.extend_from_slice(&(MAX_REQUEST_BYTES as u32 + 1).to_be_bytes());
        client.write_all(&header).await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "closed without an answer");
        assert_eq!(received.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_link_is_closed_but_not_one_with_a_call_in_flight() {
        // The server waits twice the requester's idle time: 60 s.
        let config = LinkConfig {
            idle: 30 * SECOND,
            frame_timeout: SECOND,
        };
        let (queue, mut requests) = crate::fair::fair_queue(8, 8);
        let (mut client, _) = served_and_greeted(queue, config).await;
        client
            .write_all(&request_frame(1, b"long call"))
            .await
            .unwrap();
        let request = requests.recv().await.unwrap();
        // The call runs for two idle periods: the link stays open for its answer.
        tokio::time::sleep(150 * SECOND).await;
        request.respond(b"done".to_vec()).await.unwrap();
        assert_eq!(
            read_answer(&mut client).await,
            (1, ANSWERED, b"done".to_vec())
        );
        // Then, with nothing in flight, it is closed an idle period later.
        let quiet = tokio::time::Instant::now();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(
            quiet.elapsed() == 60 * SECOND,
            "closed after {:?}",
            quiet.elapsed()
        );
    }

    /// Takes `accepts` bytes, then nothing more (and never wakes); keeps what it took.
    struct Clogged {
        accepts: usize,
        took: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for Clogged {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.accepts);
            if n == 0 {
                return Poll::Pending;
            }
            self.accepts -= n;
            self.took.lock().unwrap().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_written_after_a_frame_cut_half_way() {
        let took = Arc::new(Mutex::new(Vec::new()));
        let clogged = Clogged {
            accepts: 10,
            took: took.clone(),
        };
        let writer = FrameWriter {
            half: tokio::sync::Mutex::new(Box::new(clogged)),
            timeout: 10 * SECOND,
            broken: AtomicBool::new(false),
            breaking: Notify::new(),
            last_write: Mutex::new(tokio::time::Instant::now()),
        };
        // The first frame takes the lock and is cut after 10 bytes; the second waits
        // for the lock meanwhile.
        let (first, second) = tokio::join!(writer.send(vec![1; 100]), async {
            tokio::task::yield_now().await;
            writer.send(vec![2; 100]).await
        });
        assert!(matches!(first, Err(SendError::Cut(_))), "{first:?}");
        assert!(matches!(second, Err(SendError::NotSent)), "{second:?}");
        assert_eq!(
            *took.lock().unwrap(),
            vec![1; 10],
            "not a byte of the second"
        );
        assert!(writer.is_broken());
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_call_s_answer_restarts_the_answering_side_s_idle_time() {
        // The asker idles 30 s after an answer; the answerer must wait longer than that
        // after its answer, however long the call took.
        let config = LinkConfig {
            idle: 30 * SECOND,
            frame_timeout: SECOND,
        };
        let (queue, mut requests) = crate::fair::fair_queue(8, 8);
        let (mut client, _) = served_and_greeted(queue, config).await;
        client.write_all(&request_frame(1, b"long")).await.unwrap();
        let request = requests.recv().await.unwrap();
        tokio::time::sleep(40 * SECOND).await;
        request.respond(b"done".to_vec()).await.unwrap();
        assert_eq!(
            read_answer(&mut client).await,
            (1, ANSWERED, b"done".to_vec())
        );
        // 29 s after the answer the asker still counts the link open, and uses it.
        tokio::time::sleep(29 * SECOND).await;
        client.write_all(&request_frame(2, b"next")).await.unwrap();
        let next = requests.recv().await.expect("the link was still served");
        assert_eq!(next.bytes, b"next");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_s_links_share_its_places_for_requests_in_flight() {
        let places = Arc::new(Semaphore::new(IN_FLIGHT_PER_PEER));
        let (queue, mut requests) =
            crate::fair::fair_queue(IN_FLIGHT_PER_PEER + 8, IN_FLIGHT_PER_PEER + 8);
        let peer = PeerId::random();
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            let (queue, places) = (queue.clone(), places.clone());
            let config = LinkConfig::default();
            tokio::spawn(async move {
                serve_link(
                    peer,
                    theirs.compat(),
                    queue,
                    Counter::default(),
                    places,
                    config,
                )
                .await;
            });
            clients.push(ours.compat());
        }
        // Half the places through each link, all taken; then one more.
        for (i, client) in clients.iter_mut().enumerate() {
            for n in 0..IN_FLIGHT_PER_PEER / 2 {
                let id = (i * 1000 + n) as u64;
                client.write_all(&request_frame(id, b"x")).await.unwrap();
            }
        }
        let mut taken = Vec::new();
        for _ in 0..IN_FLIGHT_PER_PEER {
            taken.push(requests.recv().await.unwrap());
        }
        assert_eq!(places.available_permits(), 0);
        clients[0]
            .write_all(&request_frame(999, b"over"))
            .await
            .unwrap();
        // It waits (virtual time runs on only once every task is idle) until one of
        // the peer's requests is answered.
        let waited = tokio::time::timeout(10 * SECOND, requests.recv()).await;
        assert!(waited.is_err(), "over the peer's share");
        taken.pop().unwrap().respond(b"ok".to_vec()).await.unwrap();
        let over = requests.recv().await.unwrap();
        assert_eq!(over.bytes, b"over");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_cannot_get_more_places_by_closing_its_links_nor_open_more_than_two() {
        let (queue, mut requests) =
            crate::fair::fair_queue(IN_FLIGHT_PER_PEER + 8, IN_FLIGHT_PER_PEER + 8);
        let (mut open, incoming) = futures::channel::mpsc::channel(8);
        tokio::spawn(serve(
            incoming,
            queue,
            Counter::default(),
            LinkConfig::default(),
        ));
        let peer = PeerId::random();
        let link = |open: &mut futures::channel::mpsc::Sender<_>| {
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            open.try_send((peer, theirs.compat())).unwrap();
            ours.compat()
        };
        // Every place taken through one link, which then closes.
        let mut first = link(&mut open);
        for n in 0..IN_FLIGHT_PER_PEER as u64 {
            first.write_all(&request_frame(n, b"x")).await.unwrap();
        }
        let mut taken = Vec::new();
        for _ in 0..IN_FLIGHT_PER_PEER {
            taken.push(requests.recv().await.unwrap());
        }
        drop(first);
        // A new link gets no new places while those requests are in flight.
        let mut second = link(&mut open);
        second
            .write_all(&request_frame(100, b"more"))
            .await
            .unwrap();
        let waited = tokio::time::timeout(10 * SECOND, requests.recv()).await;
        assert!(waited.is_err(), "a closed link's places came back early");
        taken.pop().unwrap().respond(b"ok".to_vec()).await.unwrap();
        assert_eq!(requests.recv().await.unwrap().bytes, b"more");
        // Two links open: a third is refused, and told so.
        let _third = link(&mut open);
        let mut fourth = link(&mut open);
        assert_eq!(
            read_answer(&mut fourth).await,
            (u64::MAX, LINK_REFUSED, Vec::new())
        );
    }

    #[tokio::test]
    async fn requests_over_the_peer_s_share_go_the_long_way() {
        let (links, peer, mut theirs) = linked(LinkConfig::default()).await;
        let asking: Vec<_> = (0..IN_FLIGHT_PER_PEER)
            .map(|_| ask(&links, peer, b"x"))
            .collect();
        for _ in 0..IN_FLIGHT_PER_PEER {
            read_request(&mut theirs).await;
        }
        assert!(links.request(peer, b"one more").await.is_none());
        drop(theirs);
        for asked in asking {
            assert!(matches!(asked.await.unwrap(), Some(Err(_))));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_requester_that_reads_no_answers_loses_its_link_and_holds_nothing() {
        // A pipe that holds 64 bytes: the requester sends, and never reads.
        let (ours, theirs) = tokio::io::duplex(64);
        let (queue, mut requests) = crate::fair::fair_queue(8, 8);
        let config = LinkConfig {
            idle: 30 * SECOND,
            frame_timeout: 10 * SECOND,
        };
        let places = Arc::new(Semaphore::new(IN_FLIGHT_PER_PEER));
        let serving = tokio::spawn(serve_link(
            PeerId::random(),
            theirs.compat(),
            queue,
            Counter::default(),
            places.clone(),
            config,
        ));
        let mut client = ours.compat();
        client.write_all(&request_frame(1, b"a")).await.unwrap();
        let request = requests.recv().await.unwrap();
        assert_eq!(places.available_permits(), IN_FLIGHT_PER_PEER - 1);
        // The answer does not fit, and the answerer (the node's calls loop, say) does
        // not wait for it: the write goes on beside it.
        let answering = tokio::time::Instant::now();
        request.respond(vec![7; 4096]).await.unwrap();
        assert_eq!(answering.elapsed(), Duration::ZERO);
        // It gives up at the frame timeout, the link (its frame cut half way) closes,
        // and the request's place is given back.
        tokio::time::timeout(11 * SECOND, serving)
            .await
            .expect("the link closes")
            .unwrap();
        assert_eq!(answering.elapsed(), 10 * SECOND);
        assert_eq!(places.available_permits(), IN_FLIGHT_PER_PEER);
    }
}

/// Two real overlays on loopback: calls go on a link once one request got through,
/// and back to request-response when the link is gone.
#[cfg(test)]
mod loopback {
    use crate::bitswap::BitswapConfig;
    use crate::fetch::FetchConfig;
    use crate::network::NetworkConfig;
    use crate::rpc::{Concern, Inbound, InboundRequest};
    use crate::service::{Overlay, OverlayConfig};
    use libp2p::identity::Keypair;
    use libp2p::multiaddr::Protocol;
    use libp2p::{Multiaddr, PeerId};
    use std::time::Duration;
    use tokio::sync::mpsc;

    use super::LinkConfig;

    async fn overlay(dir: &std::path::Path, bootstrap: Vec<Multiaddr>, idle: Duration) -> Overlay {
        overlay_with(dir, bootstrap, Some(idle)).await
    }

    /// An overlay whose calls go on links idling after `idle`; none if `None`.
    async fn overlay_with(
        dir: &std::path::Path,
        bootstrap: Vec<Multiaddr>,
        idle: Option<Duration>,
    ) -> Overlay {
        let config = OverlayConfig {
            store_dir: dir.to_path_buf(),
            store_capacity: 1 << 20,
            network: NetworkConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                bootstrap,
                mdns: false,
                call_links: idle.map(|idle| LinkConfig {
                    idle,
                    ..LinkConfig::default()
                }),
                ..NetworkConfig::default()
            },
            bitswap: BitswapConfig::default(),
            fetch: FetchConfig::default(),
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let (overlay, _task) = Overlay::start(config, Keypair::generate_ed25519(), &mut registry)
            .await
            .unwrap();
        overlay
    }

    /// Answers each call with its bytes reversed; reports whether it came on a link.
    fn echo(inbound: Inbound) -> mpsc::Receiver<bool> {
        let (seen, rx) = mpsc::channel(64);
        let mut calls = inbound.calls;
        tokio::spawn(async move {
            while let Some(request) = calls.recv().await {
                let on_link = request.on_link();
                let mut bytes = request.bytes.clone();
                bytes.reverse();
                InboundRequest::respond(request, bytes).await.unwrap();
                let _ = seen.send(on_link).await;
            }
        });
        rx
    }

    async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_go_on_a_link_after_the_first_and_back_by_request_response_once_it_idles() {
        let dir = tempfile::tempdir().unwrap();
        let idle = Duration::from_millis(300);
        let server = overlay(&dir.path().join("a"), Vec::new(), idle).await;
        let mut addr = server.listen_addrs()[0].clone();
        addr.push(Protocol::P2p(server.peer_id()));
        let client = overlay(&dir.path().join("b"), vec![addr], idle).await;
        let mut seen = echo(server.take_inbound_requests().unwrap());
        let to: PeerId = server.peer_id();
        let ask = |bytes: &'static [u8]| {
            let network = client.network().clone();
            async move {
                network
                    .request(Concern::Calls, to, Vec::new(), bytes.to_vec())
                    .await
                    .unwrap()
            }
        };
        assert_eq!(ask(b"one").await, b"eno");
        assert!(
            !seen.recv().await.unwrap(),
            "the first goes by request-response"
        );
        wait_for("a link opens", || client.network().has_link(&to)).await;
        // Many at once, all on the one link, each answered with its own bytes.
        let asks = [&b"two"[..], b"three", b"four", b"five"].map(ask);
        let answers = futures::future::join_all(asks).await;
        assert_eq!(answers, [&b"owt"[..], b"eerht", b"ruof", b"evif"]);
        for _ in 0..4 {
            assert!(seen.recv().await.unwrap(), "later calls go on the link");
        }
        // Offers and jobs never go on links: an offer request is not taken as a call
        // (nobody takes offers here, so it gets no answer).
        let offer = client
            .network()
            .request(Concern::Offers, to, Vec::new(), b"x".to_vec())
            .await;
        assert!(
            offer.is_err() || offer.as_deref() == Ok(&b""[..]),
            "{offer:?}"
        );
        // Idle, the link closes; the next call goes the long way, then on a new link.
        wait_for("the idle link closes", || !client.network().has_link(&to)).await;
        assert_eq!(ask(b"six").await, b"xis");
        assert!(!seen.recv().await.unwrap());
        wait_for("a new link opens", || client.network().has_link(&to)).await;
        assert_eq!(ask(b"seven").await, b"neves");
        assert!(seen.recv().await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_to_a_peer_that_speaks_no_links_all_go_by_request_response() {
        let dir = tempfile::tempdir().unwrap();
        // An older node: it serves calls by request-response only.
        let server = overlay_with(&dir.path().join("a"), Vec::new(), None).await;
        let mut addr = server.listen_addrs()[0].clone();
        addr.push(Protocol::P2p(server.peer_id()));
        let client = overlay(&dir.path().join("b"), vec![addr], Duration::from_secs(30)).await;
        let mut seen = echo(server.take_inbound_requests().unwrap());
        let to = server.peer_id();
        for round in 0..6u8 {
            let answer = client
                .network()
                .request(Concern::Calls, to, Vec::new(), vec![round, 1])
                .await;
            assert_eq!(answer.unwrap(), vec![1, round], "call {round}");
            assert!(!seen.recv().await.unwrap());
        }
        assert!(!client.network().has_link(&to));
        let links = client.network().links().unwrap();
        // The link is tried beside the calls: under load its refusal may come after them.
        let refused = tokio::time::timeout(Duration::from_secs(20), async {
            while !links.no_link().contains_key(&to) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        assert!(refused.await.is_ok(), "a link was tried, and refused");
        assert!(!client.network().has_link(&to));
    }
}
