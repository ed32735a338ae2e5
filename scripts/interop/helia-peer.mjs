#!/usr/bin/env node
// A Helia (IPFS in JavaScript) peer for the Flotilla interoperability check
// (scripts/interop/run). libp2p over TCP on 127.0.0.1 with noise + yamux, identify,
// ping, Kademlia (/ipfs/kad/1.0.0, server mode) and bitswap; blocks in memory.
//
//   node helia-peer.mjs serve [--add LAYOUT=FILE ...]
//       Starts, imports each FILE as a UnixFS file with LAYOUT (see LAYOUTS), prints one
//       JSON line {"peer_id","listen_addrs","added":[{layout,file,cid,size,blocks}]} on
//       stdout, then serves the blocks over bitswap until SIGTERM/SIGINT.
//
//   node helia-peer.mjs fetch --dial MULTIADDR --cid CID --out FILE [--timeout-ms N]
//       Starts, dials MULTIADDR (…/p2p/ID), reads CID with @helia/unixfs `cat` (every
//       missing block comes over bitswap), writes the bytes to FILE, prints one JSON line
//       {"cid","bytes","blocks","blocks_from_bitswap","providers","dht_providers",
//       "kubo_v1_cid","ms"} and exits. `providers`: the peers bitswap got blocks from;
//       `dht_providers`: the providers of CID a Kademlia lookup found before the read.
//       `kubo_v1_cid` is the CID Helia gives the same bytes with kubo's
//       `--cid-version 1 --raw-leaves` layout, the layout Flotilla claims to follow.
//
// Logs go to stderr; DEBUG=libp2p:*,helia:* turns on libp2p's and Helia's debug logs.
// Exit status 0 on success; otherwise one line "helia-peer: REASON" on stderr and 1.

import { writeFile, readFile } from 'node:fs/promises'
import { withBitswap } from '@helia/bitswap'
import { withLibp2pLight } from '@helia/libp2p'
import { unixfs } from '@helia/unixfs'
import { decode as decodeDagPb } from '@ipld/dag-pb'
import { identify } from '@libp2p/identify'
import { kadDHT, passthroughMapper } from '@libp2p/kad-dht'
import { noise } from '@libp2p/noise'
import { peerIdFromCID } from '@libp2p/peer-id'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { yamux } from '@libp2p/yamux'
import { multiaddr } from '@multiformats/multiaddr'
import { MemoryBlockstore } from 'blockstore-core'
import { MemoryDatastore } from 'datastore-core'
import { createHeliaLight } from 'helia'
import { fixedSize } from 'ipfs-unixfs-importer/chunker'
import { balanced, trickle } from 'ipfs-unixfs-importer/layout'
import { CID } from 'multiformats/cid'

// UnixFS layouts Helia can write. `kubo-v1` is what Flotilla writes itself.
const LAYOUTS = {
  // kubo `ipfs add --cid-version 1 --raw-leaves`: 256 KiB raw leaves, 174 links a node
  'kubo-v1': { cidVersion: 1, rawLeaves: true, chunker: fixedSize({ chunkSize: 262_144 }), layout: balanced({ maxChildrenPerNode: 174 }) },
  // kubo's legacy default: CIDv0, dag-pb leaves (UnixFS File nodes carrying data)
  'kubo-v0': { cidVersion: 0, rawLeaves: false, chunker: fixedSize({ chunkSize: 262_144 }), layout: balanced({ maxChildrenPerNode: 174 }) },
  // @helia/unixfs defaults: 1 MiB raw leaves, up to 1024 links a node
  'helia-default': {},
  // a deep balanced tree (4 links a node, 16 KiB leaves): several levels of dag-pb nodes
  'deep': { cidVersion: 1, rawLeaves: true, chunker: fixedSize({ chunkSize: 16_384 }), layout: balanced({ maxChildrenPerNode: 4 }) },
  // kubo `--trickle`: a trickle DAG (file data spread over inner nodes' subtrees)
  'trickle': { cidVersion: 1, rawLeaves: true, chunker: fixedSize({ chunkSize: 65_536 }), layout: trickle() }
}

function fail (reason) {
  process.stderr.write(`helia-peer: ${reason}\n`)
  process.exit(1)
}

function parseArgs (argv) {
  const [command, ...rest] = argv
  const opts = { add: [] }
  for (let i = 0; i < rest.length; i++) {
    const flag = rest[i]
    const value = rest[i + 1]
    if (value === undefined) fail(`${flag} needs a value`)
    i++
    switch (flag) {
      case '--add': opts.add.push(value); break
      case '--dial': opts.dial = value; break
      case '--cid': opts.cid = value; break
      case '--out': opts.out = value; break
      case '--timeout-ms': opts.timeoutMs = Number(value); break
      default: fail(`unknown flag ${flag}`)
    }
  }
  return { command, opts }
}

async function startHelia () {
  const blockstore = new MemoryBlockstore()
  const datastore = new MemoryDatastore()
  const helia = withBitswap(withLibp2pLight(createHeliaLight({ blockstore, datastore }), {
    addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
    services: {
      identify: identify(),
      ping: ping(),
      dht: kadDHT({
        protocol: '/ipfs/kad/1.0.0',
        clientMode: false,
        // keep loopback addresses (the default public-DHT mapper drops them)
        peerInfoMapper: passthroughMapper
      })
    }
  }))
  await helia.start()
  return helia
}

async function countBlocks (helia, cid) {
  // every block of the DAG is in the local blockstore once `cat` has read it
  let n = 0
  const seen = new Set()
  const walk = async (c) => {
    if (seen.has(c.toString())) return
    seen.add(c.toString())
    n++
    if (c.code === 0x70) {
      const node = decodeDagPb(await toBytes(helia.blockstore.get(c, { offline: true })))
      for (const link of node.Links) await walk(link.Hash)
    }
  }
  await walk(cid)
  return n
}

async function toBytes (maybeIter) {
  const v = await maybeIter
  if (v instanceof Uint8Array) return v
  const parts = []
  for await (const p of v) parts.push(p)
  return Buffer.concat(parts)
}

async function serve (opts) {
  const helia = await startHelia()
  const fs = unixfs(helia)
  const added = []
  for (const spec of opts.add) {
    const eq = spec.indexOf('=')
    if (eq < 0) fail(`--add wants LAYOUT=FILE, got ${spec}`)
    const layout = spec.slice(0, eq)
    const file = spec.slice(eq + 1)
    if (!(layout in LAYOUTS)) fail(`unknown layout ${layout} (known: ${Object.keys(LAYOUTS).join(', ')})`)
    const bytes = await readFile(file)
    const cid = await fs.addBytes(bytes, LAYOUTS[layout])
    added.push({ layout, file, cid: cid.toString(), size: bytes.length, blocks: await countBlocks(helia, cid) })
  }
  const stop = async () => {
    await helia.stop().catch(() => {})
    process.exit(0)
  }
  process.on('SIGTERM', stop)
  process.on('SIGINT', stop)
  process.stdout.write(JSON.stringify({
    peer_id: helia.libp2p.peerId.toString(),
    listen_addrs: helia.libp2p.getMultiaddrs().map(String),
    added
  }) + '\n')
}

async function fetch (opts) {
  if (opts.dial == null || opts.cid == null || opts.out == null) fail('fetch needs --dial, --cid and --out')
  const started = Date.now()
  const cid = CID.parse(opts.cid)
  const signal = AbortSignal.timeout(opts.timeoutMs ?? 60_000)
  const helia = await startHelia()
  try {
    const conn = await helia.libp2p.dial(multiaddr(opts.dial), { signal })
    process.stderr.write(`helia-peer: connected to ${conn.remotePeer} at ${conn.remoteAddr}\n`)
    // Kademlia: ask the DHT (i.e. the peer we dialled) who provides the root
    const dhtProviders = []
    try {
      for await (const prov of helia.libp2p.contentRouting.findProviders(cid, { signal: AbortSignal.any([signal, AbortSignal.timeout(15_000)]) })) {
        dhtProviders.push(prov.id.toString())
      }
    } catch (err) {
      process.stderr.write(`helia-peer: DHT provider lookup ended: ${err.message}\n`)
    }
    const providers = new Set()
    let fromBitswap = 0
    const onProgress = (evt) => {
      if (evt.type === 'helia:block-broker:receive-block' && evt.detail.broker === 'bitswap') {
        fromBitswap++
        providers.add(peerIdFromCID(evt.detail.provider).toString())
      }
    }
    const parts = []
    for await (const chunk of unixfs(helia).cat(cid, { signal, onProgress })) parts.push(chunk)
    const bytes = Buffer.concat(parts)
    await writeFile(opts.out, bytes)
    // the CID these bytes get under kubo's --cid-version 1 --raw-leaves layout
    const scratch = unixfs({ blockstore: new MemoryBlockstore() })
    const kuboV1 = await scratch.addBytes(bytes, LAYOUTS['kubo-v1'])
    process.stdout.write(JSON.stringify({
      cid: cid.toString(),
      bytes: bytes.length,
      blocks: await countBlocks(helia, cid),
      blocks_from_bitswap: fromBitswap,
      providers: [...providers],
      dht_providers: [...new Set(dhtProviders)],
      kubo_v1_cid: kuboV1.toString(),
      ms: Date.now() - started
    }) + '\n')
  } finally {
    await helia.stop().catch(() => {})
  }
}

const { command, opts } = parseArgs(process.argv.slice(2))
try {
  if (command === 'serve') await serve(opts)
  else if (command === 'fetch') { await fetch(opts); process.exit(0) }
  else fail('usage: helia-peer.mjs serve [--add LAYOUT=FILE ...] | fetch --dial MULTIADDR --cid CID --out FILE [--timeout-ms N]')
} catch (err) {
  fail(`${command}: ${err.name ?? 'Error'}: ${err.message}`)
}
