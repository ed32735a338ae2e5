//! Peers that misbehave: forged blocks, oversize and malformed bitswap messages.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::{RawPeer, add, fetch, metric, network, random_bytes};
use flotilla_overlay::bitswap::message::{Message, Presence, ReceivedBlock, WantEntry, WantType};
use flotilla_overlay::bitswap::{PROTOCOL, wire};
use flotilla_overlay::block::{Block, RAW};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use std::time::Duration;

/// Makes `peer` answer wants as `script` says: for each want-block, the block to send
/// (`None`: stay silent); want-haves get HAVE whenever the script has a block for them.
fn serve_scripted<F>(peer: &mut RawPeer, script: F)
where
    F: Fn(&WantEntry) -> Option<ReceivedBlock> + Send + Sync + 'static,
{
    let mut incoming = peer.control.accept(PROTOCOL).unwrap();
    let control = peer.control.clone();
    let script = std::sync::Arc::new(script);
    tokio::spawn(async move {
        while let Some((from, mut stream)) = incoming.next().await {
            let (mut control, script) = (control.clone(), script.clone());
            tokio::spawn(async move {
                let mut reply = control.open_stream(from, PROTOCOL).await.unwrap();
                while let Ok(Some(frame)) =
                    wire::read_frame(&mut stream, wire::MAX_MESSAGE_SIZE).await
                {
                    let msg = Message::decode(frame, 1024).unwrap();
                    let mut answer = Message::default();
                    for want in msg.wants.iter().filter(|w| !w.cancel) {
                        let Some(block) = script(want) else { continue };
                        match want.want_type {
                            WantType::Have => answer.presences.push((want.cid, Presence::Have)),
                            WantType::Block => answer.blocks.push(block),
                        }
                    }
                    if !answer.is_empty()
                        && wire::write_frame(&mut reply, &answer.encode())
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
}

/// Makes `peer` claim every block and send, for each, bytes that are not the block.
fn serve_forgeries(peer: &mut RawPeer) {
    serve_scripted(peer, |want| {
        let forged = Bytes::from(format!("not {}", want.cid));
        let cid = *Block::encode(RAW, forged.clone()).unwrap().cid();
        Some(ReceivedBlock { cid, data: forged })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_blocks_are_rejected_and_the_fetch_completes_from_an_honest_provider() {
    let (_dir, nodes) = network(2).await;
    let (honest, fetcher) = (&nodes[0], &nodes[1]);
    let data = random_bytes(2 * 1024 * 1024, 4);
    let root = add(honest, &data).await;
    let mut liar = RawPeer::connect(fetcher).await;
    serve_forgeries(&mut liar);

    let (fetched, _) = fetch(fetcher, root).await;
    assert!(fetched == data, "fetched file differs");
    let rejected = metric(fetcher, "flotilla_bitswap_blocks_rejected_total").await;
    assert!(rejected >= 1.0, "no forged block was counted");
    for node in nodes {
        node.stop().await;
    }
}

/// Writes `bytes` on a fresh bitswap stream and waits for the node to close it.
async fn send_and_expect_close(peer: &mut RawPeer, node_peer: libp2p::PeerId, bytes: &[u8]) {
    let mut stream = peer.control.open_stream(node_peer, PROTOCOL).await.unwrap();
    expect_closed(&mut stream, bytes).await;
}

/// Writes `bytes` on `stream` and expects the node to close it (within 10 s) unanswered.
async fn expect_closed(stream: &mut libp2p::Stream, bytes: &[u8]) {
    // The node may close the stream before we finish writing; that is the point.
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the node kept the stream open: {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_malformed_messages_close_only_their_stream() {
    let (_dir, nodes) = network(1).await;
    let node = &nodes[0];
    let root = add(node, b"still serving").await;
    let mut peer = RawPeer::connect(node).await;
    let mut answers = peer.control.accept(PROTOCOL).unwrap();

    // A frame announcing 5 MiB, over the 4 MiB limit.
    let mut oversize = Vec::new();
    oversize.extend_from_slice(unsigned_varint::encode::usize(
        5 * 1024 * 1024,
        &mut unsigned_varint::encode::usize_buffer(),
    ));
    oversize.extend_from_slice(&[0u8; 1024]);
    send_and_expect_close(&mut peer, node.peer_id(), &oversize).await;
    // A frame of the right size that is not a protobuf message.
    let mut garbage = Vec::new();
    wire::write_frame(&mut garbage, &[0xff; 64]).await.unwrap();
    send_and_expect_close(&mut peer, node.peer_id(), &garbage).await;
    assert_eq!(
        metric(node, "flotilla_bitswap_bad_messages_total").await,
        2.0
    );

    // The connection survives and the node still answers a good want.
    let mut stream = peer
        .control
        .open_stream(node.peer_id(), PROTOCOL)
        .await
        .unwrap();
    let want = Message {
        wants: vec![WantEntry::block(root)],
        ..Message::default()
    };
    wire::write_frame(&mut stream, &want.encode())
        .await
        .unwrap();
    let (from, mut inbound) = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, node.peer_id());
    let frame = wire::read_frame(&mut inbound, wire::MAX_MESSAGE_SIZE)
        .await
        .unwrap()
        .unwrap();
    let answer = Message::decode(frame, 1024).unwrap();
    assert_eq!(answer.blocks.len(), 1);
    assert_eq!(answer.blocks[0].cid, root);
    assert_eq!(answer.blocks[0].data, Bytes::from_static(b"still serving"));
    assert!(
        node.overlay()
            .network()
            .connected_peers()
            .await
            .unwrap()
            .contains(&peer.peer_id)
    );
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_the_wantlist_limit_gets_only_the_limit() {
    let (_dir, nodes) = network(1).await;
    let node = &nodes[0];
    let mut peer = RawPeer::connect(node).await;
    let mut stream = peer
        .control
        .open_stream(node.peer_id(), PROTOCOL)
        .await
        .unwrap();
    // 1024 entries per message is the most accepted; send two full messages of wants for
    // blocks the node lacks, without send-dont-have so they stay in its wantlist.
    for round in 0..2u32 {
        let wants = (0..1024u32)
            .map(|i| {
                let cid =
                    *Block::encode(RAW, Bytes::from((round * 1024 + i).to_le_bytes().to_vec()))
                        .unwrap()
                        .cid();
                WantEntry {
                    send_dont_have: false,
                    ..WantEntry::block(cid)
                }
            })
            .collect();
        wire::write_frame(
            &mut stream,
            &Message {
                wants,
                ..Message::default()
            }
            .encode(),
        )
        .await
        .unwrap();
    }
    common::wait_until("the node has dropped the wants over its limit", || async {
        metric(node, "flotilla_bitswap_wants_dropped_total").await == 1024.0
    })
    .await;
    for node in nodes {
        node.stop().await;
    }
}

/// Makes `peer` serve `blocks` honestly in content but claiming every block is `raw`,
/// whatever its real codec.
fn serve_with_raw_prefixes(
    peer: &mut RawPeer,
    blocks: std::collections::HashMap<flotilla_overlay::Cid, Bytes>,
) {
    serve_scripted(peer, move |want| {
        let data = blocks.get(&want.cid)?.clone();
        Some(ReceivedBlock {
            cid: flotilla_overlay::Cid::new_v1(RAW, *want.cid.hash()),
            data,
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_sent_under_another_codec_keeps_the_codec_asked_for() {
    let (_dir, nodes) = network(1).await;
    let fetcher = &nodes[0];
    // A three-block file: a dag-pb root over two raw leaves, held only by the raw peer.
    let data = random_bytes(2 * 256 * 1024 + 10, 6);
    let mut builder = flotilla_overlay::unixfs::FileBuilder::new();
    let mut blocks = std::collections::HashMap::new();
    for chunk in data.chunks(256 * 1024) {
        for b in builder.push_chunk(Bytes::copy_from_slice(chunk)).unwrap() {
            blocks.insert(*b.cid(), b.data().clone());
        }
    }
    let (rest, root) = builder.finish().unwrap();
    for b in rest {
        blocks.insert(*b.cid(), b.data().clone());
    }
    let mut peer = RawPeer::connect(fetcher).await;
    serve_with_raw_prefixes(&mut peer, blocks);

    let (fetched, progress) = fetch(fetcher, root).await;
    assert_eq!(progress.blocks, 4, "the root's links were followed");
    assert!(fetched == data);
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_many_half_sent_streams_does_not_stop_the_node_serving() {
    let (_dir, nodes) = network(2).await;
    let data = random_bytes(600 * 1024, 7);
    let root = add(&nodes[0], &data).await;
    // Three peers with 400 half-sent streams each: more than the node serves at once
    // from all peers together (1024), so only the per-peer limit keeps room for others.
    let mut hogs = Vec::new();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut hog = RawPeer::connect(&nodes[0]).await;
        for _ in 0..400 {
            let Ok(mut stream) = hog.control.open_stream(nodes[0].peer_id(), PROTOCOL).await else {
                break;
            };
            // Half a length prefix, then nothing. Streams past the per-peer limit are
            // reset by the node, so writing to them may fail.
            let _ = stream.write_all(&[0x80]).await;
            let _ = stream.flush().await;
            streams.push(stream);
        }
        hogs.push(hog);
    }
    assert!(
        fetch(&nodes[1], root).await.0 == data,
        "the node stopped serving others"
    );
    drop(streams);
    for node in nodes {
        node.stop().await;
    }
}

/// Sends a request frame on a link and reads the answer frame's id and status.
async fn ask_on_link(stream: &mut libp2p::Stream, id: u64, body: &[u8]) -> (u64, u8) {
    let mut frame = id.to_be_bytes().to_vec();
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(body);
    stream.write_all(&frame).await.unwrap();
    stream.flush().await.unwrap();
    let mut header = [0u8; 13];
    stream.read_exact(&mut header).await.unwrap();
    let len = u32::from_be_bytes(header[9..13].try_into().unwrap());
    let mut answer = vec![0u8; len as usize];
    stream.read_exact(&mut answer).await.unwrap();
    (
        u64::from_be_bytes(header[..8].try_into().unwrap()),
        header[8],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_keeps_at_most_two_links_and_an_oversize_frame_closes_only_its_own() {
    use flotilla_overlay::link::{LINKS_PER_PEER, PROTOCOL as LINK};
    let (_dir, nodes) = network(1).await;
    let node = &nodes[0];
    let peer = RawPeer::connect(node).await;
    let mut control = peer.control.clone();
    let mut open = Vec::new();
    for _ in 0..LINKS_PER_PEER {
        let mut link = control.open_stream(node.peer_id(), LINK).await.unwrap();
        link.flush().await.unwrap();
        // The node greets a link it takes (id u64::MAX, status 4) before anything else.
        let mut greeting = [0u8; 13];
        link.read_exact(&mut greeting).await.unwrap();
        assert_eq!(
            (&greeting[..8], greeting[8]),
            (&u64::MAX.to_be_bytes()[..], 4)
        );
        open.push(link);
    }
    // Each link is served (a request that is no call is answered with a refusal).
    for (i, link) in open.iter_mut().enumerate() {
        assert_eq!(
            ask_on_link(link, i as u64 + 10, b"junk").await,
            (i as u64 + 10, 0)
        );
    }
    // One more is told it is refused instead (status 3), then closed; a request written
    // on it anyway is not read.
    let mut extra = control.open_stream(node.peer_id(), LINK).await.unwrap();
    let mut frame = 1u64.to_be_bytes().to_vec();
    frame.extend_from_slice(&4u32.to_be_bytes());
    frame.extend_from_slice(b"junk");
    let _ = extra.write_all(&frame).await;
    let _ = extra.flush().await;
    let mut refusal = [0u8; 13];
    tokio::time::timeout(Duration::from_secs(10), extra.read_exact(&mut refusal))
        .await
        .expect("told within 10 s")
        .unwrap();
    assert_eq!(refusal[..8], u64::MAX.to_be_bytes());
    assert_eq!(refusal[8], 3, "link refused");
    expect_closed(&mut extra, b"").await;
    // A frame claiming 4 GiB closes its own link, not the other.
    let mut header = 2u64.to_be_bytes().to_vec();
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    expect_closed(&mut open[0], &header).await;
    assert_eq!(ask_on_link(&mut open[1], 3, b"junk").await, (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_to_a_peer_that_speaks_none_of_our_protocols_fails_at_once() {
    use flotilla_overlay::rpc::{Concern, RpcError};
    let (_dir, nodes) = network(1).await;
    let node = &nodes[0];
    // A bare libp2p peer: it speaks libp2p-stream's protocols only (none registered).
    let peer = RawPeer::connect(node).await;
    for concern in Concern::ALL {
        let asked = tokio::time::timeout(
            Duration::from_secs(10),
            node.overlay()
                .network()
                .request(concern, peer.peer_id, Vec::new(), b"hello".to_vec()),
        )
        .await
        .expect("refused at once, not timed out");
        let error = asked.unwrap_err();
        eprintln!("{concern}: {error}");
        assert_eq!(
            error,
            RpcError::Unsupported(peer.peer_id, concern),
            "{error}"
        );
    }
    // The node goes on serving.
    let root = add(node, b"still here").await;
    assert!(node.overlay().store().has(&root));
}
