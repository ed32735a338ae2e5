//! Framing of bitswap messages on a stream: an unsigned-varint length, then the message.

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use std::io;
use std::time::Duration;

/// The largest message we read or write: 4 MiB.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Reads one length-prefixed frame; `Ok(None)` at a clean end of stream.
///
/// A frame announcing more than `max` bytes is an error: the caller drops the stream
/// without reading the rest. Memory grows with the bytes that actually arrive, not with
/// the length announced.
pub async fn read_frame<R: AsyncRead + Unpin>(io: &mut R, max: usize) -> io::Result<Option<Bytes>> {
    read_frame_within(io, max, None).await
}

/// [`read_frame`], failing with `TimedOut` if the body does not arrive within
/// `body_timeout` of its length (a peer cannot hold a reader with half a message).
pub async fn read_frame_within<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
    body_timeout: Option<Duration>,
) -> io::Result<Option<Bytes>> {
    let Some(len) = read_len(io, max).await? else {
        return Ok(None);
    };
    read_body(io, len, body_timeout).await.map(Some)
}

/// [`read_frame_within`], also failing with [`FrameError::Idle`] (an `io::Error` of kind
/// `TimedOut`) if no frame starts within `idle`: a silent stream cannot hold its reader,
/// nor the slot that reader takes, for ever.
pub async fn read_frame_timed<R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
    idle: Duration,
    body_timeout: Duration,
) -> io::Result<Option<Bytes>> {
    let len = tokio::time::timeout(idle, read_len(io, max))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, FrameError::Idle))??;
    let Some(len) = len else {
        return Ok(None);
    };
    read_body(io, len, Some(body_timeout)).await.map(Some)
}

/// Why a frame could not be read, besides I/O errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// No frame started within the idle timeout.
    #[error("no message started within the idle timeout")]
    Idle,
}

/// Whether `e` is [`FrameError::Idle`].
pub fn is_idle(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<FrameError>())
        .is_some_and(|f| *f == FrameError::Idle)
}

/// Reads a frame's length; `Ok(None)` at a clean end of stream.
async fn read_len<R: AsyncRead + Unpin>(io: &mut R, max: usize) -> io::Result<Option<usize>> {
    let len = match unsigned_varint::aio::read_usize(&mut *io).await {
        Ok(len) => len,
        Err(unsigned_varint::io::ReadError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Ok(None);
        }
        Err(unsigned_varint::io::ReadError::Io(e)) => return Err(e),
        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
    };
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over the {max}-byte limit"),
        ));
    }
    Ok(Some(len))
}

/// Reads a body of `len` bytes (its memory grows with the bytes that arrive).
async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    len: usize,
    body_timeout: Option<Duration>,
) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(len.min(256 * 1024));
    let mut limited = (&mut *io).take(len as u64);
    let body = limited.read_to_end(&mut buf);
    match body_timeout {
        Some(limit) => tokio::time::timeout(limit, body).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "message body did not arrive in time",
            )
        })??,
        None => body.await?,
    };
    if buf.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "stream ended inside a message",
        ));
    }
    Ok(Bytes::from(buf))
}

/// Writes one length-prefixed frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, frame: &[u8]) -> io::Result<()> {
    if frame.len() > MAX_MESSAGE_SIZE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "message over the size limit",
        ));
    }
    let mut prefix = unsigned_varint::encode::usize_buffer();
    io.write_all(unsigned_varint::encode::usize(frame.len(), &mut prefix))
        .await?;
    io.write_all(frame).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[tokio::test]
    async fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"one").await.unwrap();
        write_frame(&mut buf, b"").await.unwrap();
        write_frame(&mut buf, &[7u8; 300]).await.unwrap();
        let mut cursor = Cursor::new(buf);
        assert_eq!(
            read_frame(&mut cursor, 1024).await.unwrap().unwrap(),
            &b"one"[..]
        );
        assert_eq!(
            read_frame(&mut cursor, 1024).await.unwrap().unwrap(),
            &b""[..]
        );
        assert_eq!(
            read_frame(&mut cursor, 1024).await.unwrap().unwrap().len(),
            300
        );
        assert!(read_frame(&mut cursor, 1024).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversize_and_truncated_frames_are_errors() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &[1u8; 100]).await.unwrap();
        assert!(read_frame(&mut Cursor::new(buf.clone()), 99).await.is_err());
        buf.truncate(50);
        assert!(read_frame(&mut Cursor::new(buf), 1024).await.is_err());
        // A varint that never ends.
        assert!(
            read_frame(&mut Cursor::new(vec![0xffu8; 12]), 1024)
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_times_out_but_a_slow_one_does_not() {
        let idle = Duration::from_secs(60);
        let body = Duration::from_secs(30);
        // Nothing ever arrives: the read ends after the idle timeout.
        let (mut silent, _keep) = tokio::io::duplex(64);
        let mut silent = tokio_util::compat::TokioAsyncReadCompatExt::compat(&mut silent);
        let started = tokio::time::Instant::now();
        let err = read_frame_timed(&mut silent, 1024, idle, body)
            .await
            .unwrap_err();
        assert!(is_idle(&err), "{err}");
        assert_eq!(started.elapsed(), idle);
        // A frame that starts before the timeout is read whole.
        let (mut reader, mut writer) = tokio::io::duplex(64);
        tokio::spawn(async move {
            tokio::time::sleep(idle / 2).await;
            let mut w = tokio_util::compat::TokioAsyncWriteCompatExt::compat_write(&mut writer);
            write_frame(&mut w, b"late but in time").await.unwrap();
            tokio::time::sleep(idle * 2).await;
        });
        let mut reader = tokio_util::compat::TokioAsyncReadCompatExt::compat(&mut reader);
        let frame = read_frame_timed(&mut reader, 1024, idle, body)
            .await
            .unwrap();
        assert_eq!(frame.unwrap(), &b"late but in time"[..]);
    }
}
