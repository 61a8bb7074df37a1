//! A broadcast (`POST /v1/call_all/<endpoint>`) sent to every healthy replica at once, and its
//! answer when every replica answered the call: the replies spliced into one envelope
//! (`{"results", "replicas", "errors"}`), in the caller's body format, without decoding them.
//!
//! Which replicas take a broadcast is no decision: every healthy one in Python's table. Anything
//! else is Python's: when a replica failed, refused or answered in a shape the relay does not
//! splice, the Python server answers from every replica's outcome as it came
//! (`Relay.take_broadcast`), exactly as it does for a broadcast it sent itself. The call is
//! never sent twice.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinSet;

use crate::conn::{delegate, exchange, upstream_head, Answer, Exchanged, Failure, Handed};
use crate::http::{RequestHead, ResponseHead};
use crate::upstream::Upstream;
use crate::wire::{self, Format};
use crate::{names, Shared};

/// A reply as received: the whole response, its head read.
pub struct Received {
    pub bytes: Vec<u8>,
    pub head: ResponseHead,
}

impl Received {
    pub fn body(&self) -> &[u8] {
        &self.bytes[self.head.head_len..]
    }

    pub fn content_type(&self) -> Option<&[u8]> {
        self.head.content_type.map(|(a, b)| &self.bytes[a..b])
    }
}

/// One replica's part: who, how long it took, and what came back.
pub struct Outcome {
    pub index: u32,
    pub name: Arc<str>,
    pub seconds: f64,
    pub reply: Result<Received, Failure>,
}

/// Whether `name` may name an endpoint, as Python's `wire.is_endpoint_name` (an ASCII
/// identifier): the endpoint goes into the request line sent to every replica.
pub fn is_endpoint_name(name: &[u8]) -> bool {
    match name.split_first() {
        Some((first, rest)) => {
            (first.is_ascii_alphabetic() || *first == b'_')
                && rest.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
        }
        None => false,
    }
}

/// Where a reply's result lies in its response, when the relay can nest it as it is: a
/// success (2xx) in the caller's format, `{"result":...}` in JSON or msgpack (the replica's
/// one shape for a success), any message in the binary format (nested whole).
pub fn result_of(fmt: Format, reply: &Received) -> Option<Range<usize>> {
    const JSON_HEAD: &[u8] = br#"{"result":"#;
    const MSGPACK_HEAD: &[u8] = b"\x81\xa6result";
    if !(200..300).contains(&reply.head.status) || wire::body_format(reply.content_type()) != fmt {
        return None;
    }
    let body = reply.body();
    let start = reply.head.head_len;
    let end = reply.bytes.len();
    match fmt {
        Format::Json => {
            (body.len() > JSON_HEAD.len() && body.starts_with(JSON_HEAD) && body.ends_with(b"}"))
                .then(|| start + JSON_HEAD.len()..end - 1)
        }
        Format::Msgpack => (body.len() > MSGPACK_HEAD.len() && body.starts_with(MSGPACK_HEAD))
            .then(|| start + MSGPACK_HEAD.len()..end),
        Format::Binary => Some(start..end),
    }
}

/// A body as the pieces to write in order: small ones gathered in one buffer, a large reply
/// written from where it was received.
#[derive(Default)]
pub struct Parts {
    pub parts: Vec<(Vec<u8>, Range<usize>)>,
    pub len: usize,
    open: bool, // the last part is ours to append to
}

/// Replies above this are written from their own buffer, not copied.
const COPY_BELOW: usize = 64 * 1024;

impl Parts {
    pub fn copy(&mut self, bytes: &[u8]) {
        if !self.open {
            self.parts.push((Vec::with_capacity(4096), 0..0));
            self.open = true;
        }
        let (buf, range) = self.parts.last_mut().expect("an open part");
        buf.extend_from_slice(bytes);
        *range = 0..buf.len();
        self.len += bytes.len();
    }

    /// Padding between binary messages: always shorter than the alignment.
    pub fn zeros(&mut self, n: usize) {
        self.copy(&[0; names::BINARY_ALIGN][..n]);
    }

    pub fn take(&mut self, buf: Vec<u8>, range: Range<usize>) {
        if range.len() < COPY_BELOW {
            self.copy(&buf[range]);
        } else {
            self.len += range.len();
            self.parts.push((buf, range));
            self.open = false;
        }
    }

    pub fn append_to(&self, out: &mut Vec<u8>) {
        out.reserve(self.len);
        for (buf, range) in &self.parts {
            out.extend_from_slice(&buf[range.clone()]);
        }
    }

    pub fn concat(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.append_to(&mut out);
        out
    }
}

/// The envelope `{"results": [...], "replicas": [...], "errors": {}}` in `fmt`, each result
/// nested from its reply (`results`: where in each reply, see `result_of`), as Python's
/// `wire.encode_as` and `values.encode(messages=...)` would write it.
pub fn envelope(
    fmt: Format,
    names: &[Arc<str>],
    replies: Vec<Received>,
    results: Vec<Range<usize>>,
) -> Parts {
    let mut out = Parts::default();
    let lengths: Vec<usize> = results.iter().map(Range::len).collect();
    let pairs = replies.into_iter().zip(results);
    match fmt {
        Format::Json => {
            out.copy(br#"{"results":["#);
            for (i, (reply, result)) in pairs.enumerate() {
                if i > 0 {
                    out.copy(b",");
                }
                out.take(reply.bytes, result);
            }
            let mut tail = String::from(r#"],"replicas":["#);
            for (i, name) in names.iter().enumerate() {
                if i > 0 {
                    tail.push(',');
                }
                wire::json_string(&mut tail, name);
            }
            tail.push_str(r#"],"errors":{}}"#);
            out.copy(tail.as_bytes());
        }
        Format::Msgpack => {
            let mut head = Vec::with_capacity(16);
            wire::msgpack_map(&mut head, 3);
            wire::msgpack_str(&mut head, "results");
            wire::msgpack_array(&mut head, names.len());
            out.copy(&head);
            for (reply, result) in pairs {
                out.take(reply.bytes, result);
            }
            let mut tail = Vec::with_capacity(32 * names.len());
            names_and_no_errors(&mut tail, names);
            out.copy(&tail);
        }
        Format::Binary => {
            // The skeleton refers to each reply as a whole message, carried as buffer i.
            let mut skeleton = Vec::with_capacity(32 * names.len());
            wire::msgpack_map(&mut skeleton, 3);
            wire::msgpack_str(&mut skeleton, "results");
            wire::msgpack_array(&mut skeleton, names.len());
            for i in 0..names.len() {
                let mut index = Vec::with_capacity(9);
                wire::msgpack_uint(&mut index, i as u64);
                wire::msgpack_ext(&mut skeleton, names::BINARY_EXT_MESSAGE as i8, &index);
            }
            names_and_no_errors(&mut skeleton, names);
            let (prefix, pads) = binary_prefix(&skeleton, &lengths);
            out.copy(&prefix);
            for ((reply, result), pad) in pairs.zip(pads) {
                out.take(reply.bytes, result);
                out.zeros(pad);
            }
        }
    }
    out
}

fn names_and_no_errors(out: &mut Vec<u8>, names: &[Arc<str>]) {
    wire::msgpack_str(out, "replicas");
    wire::msgpack_array(out, names.len());
    for name in names {
        wire::msgpack_str(out, name);
    }
    wire::msgpack_str(out, "errors");
    wire::msgpack_map(out, 0);
}

fn aligned(n: usize) -> usize {
    n.div_ceil(names::BINARY_ALIGN) * names::BINARY_ALIGN
}

/// A binary message's head, buffer table and skeleton, padded to its first buffer, and the
/// padding after each buffer (none after the last), for buffers of `lengths` bytes
/// (docs/wire-format.md).
pub fn binary_prefix(skeleton: &[u8], lengths: &[usize]) -> (Vec<u8>, Vec<usize>) {
    let prefix_len = 24 + 16 * lengths.len() + skeleton.len();
    let mut offset = if lengths.is_empty() {
        prefix_len
    } else {
        aligned(prefix_len)
    };
    let first = offset;
    let mut table = Vec::with_capacity(16 * lengths.len());
    let mut pads = Vec::with_capacity(lengths.len());
    for (i, &n) in lengths.iter().enumerate() {
        table.extend_from_slice(&(offset as u64).to_le_bytes());
        table.extend_from_slice(&(n as u64).to_le_bytes());
        offset += n;
        let pad = if i + 1 < lengths.len() {
            aligned(offset) - offset
        } else {
            0
        };
        offset += pad;
        pads.push(pad);
    }
    let mut out = Vec::with_capacity(first);
    out.extend_from_slice(names::BINARY_MAGIC.as_bytes());
    out.push(names::BINARY_VERSION as u8);
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&(skeleton.len() as u64).to_le_bytes());
    out.extend_from_slice(&(lengths.len() as u64).to_le_bytes());
    out.extend_from_slice(&table);
    out.extend_from_slice(skeleton);
    out.resize(first, 0);
    (out, pads)
}

/// The envelope the relay answers a broadcast with when these responses came back, or None when
/// it would hand them to Python: for the test that it is what Python writes.
pub fn splice(content_type: &[u8], names: &[String], responses: Vec<Vec<u8>>) -> Option<Vec<u8>> {
    let fmt = wire::body_format(Some(content_type));
    let mut replies = Vec::with_capacity(responses.len());
    for bytes in responses {
        let head = crate::http::parse_response(&bytes).ok()??;
        replies.push(Received { bytes, head });
    }
    let results: Option<Vec<_>> = replies.iter().map(|r| result_of(fmt, r)).collect();
    let names: Vec<Arc<str>> = names.iter().map(|n| Arc::from(n.as_str())).collect();
    Some(envelope(fmt, &names, replies, results?).concat())
}

struct Target {
    index: u32,
    addr: SocketAddr,
    host: String,
    name: Arc<str>,
    pooled: Option<Upstream>,
}

/// Answer a broadcast: sent to every healthy replica, answered here when all of them answered
/// the call, else by the Python server from every replica's outcome.
pub async fn answer(shared: &Arc<Shared>, raw: &[u8], head: &RequestHead) -> Answer {
    let endpoint = &raw[head.path.0 + names::PATHS_CALL_ALL.len()..head.path.1];
    let picked = if is_endpoint_name(endpoint) {
        let mut state = shared.state.lock().unwrap();
        let allowed = state
            .tokens
            .allows(head.auth.map_or(&b""[..], |(a, b)| &raw[a..b]));
        let targets: Vec<Target> = state
            .replicas
            .iter_mut()
            .filter(|r| allowed && r.healthy)
            .map(|r| {
                r.in_flight += 1;
                Target {
                    index: r.index,
                    addr: r.addr,
                    host: r.host_header.clone(),
                    name: r.name.clone(),
                    pooled: std::iter::from_fn(|| r.idle.pop()).find(Upstream::still_open),
                }
            })
            .collect();
        (!targets.is_empty()).then(|| (targets, state.tokens.line.clone()))
    } else {
        None
    };
    // No token, no replica, no endpoint name: the Python server says which.
    let Some((targets, auth_line)) = picked else {
        return delegate(shared, raw, head, Handed::Whole).await;
    };

    let path = [names::PATHS_CALL.as_bytes(), endpoint].concat();
    let body: Arc<[u8]> = Arc::from(&raw[head.head_len..head.head_len + head.content_length]);
    let mut sends = JoinSet::new();
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(targets.len());
    for (slot, target) in targets.into_iter().enumerate() {
        let request = upstream_head(&auth_line, raw, head, &path, &target.host, None);
        outcomes.push(Outcome {
            index: target.index,
            name: target.name,
            seconds: 0.0,
            reply: Err(Failure::Lost),
        });
        let (shared, body) = (shared.clone(), body.clone());
        let (addr, pooled) = (target.addr, target.pooled);
        sends.spawn(async move {
            (
                slot,
                addr,
                send(&shared, addr, pooled, request, &body).await,
            )
        });
    }
    let mut conns = Vec::with_capacity(outcomes.len());
    while let Some(joined) = sends.join_next().await {
        // A send that panicked stays "lost", as its outcome starts.
        if let Ok((slot, addr, (seconds, exchanged))) = joined {
            let outcome = &mut outcomes[slot];
            outcome.seconds = seconds;
            outcome.reply = exchanged.map(|done| {
                if done.reusable {
                    conns.push((outcome.index, addr, done.conn));
                }
                Received {
                    bytes: done.bytes,
                    head: done.head,
                }
            });
        }
    }
    {
        let mut state = shared.state.lock().unwrap();
        for o in &outcomes {
            let ok = o.reply.as_ref().is_ok_and(|r| r.head.status < 400);
            state.record(o.index, o.seconds, ok);
        }
        for (index, addr, conn) in conns {
            state.put_idle(index, addr, conn);
        }
    }

    let fmt = wire::body_format(head.content_type.map(|(a, b)| &raw[a..b]));
    let results: Option<Vec<Range<usize>>> = outcomes
        .iter()
        .map(|o| o.reply.as_ref().ok().and_then(|r| result_of(fmt, r)))
        .collect();
    let Some(results) = results else {
        // Python takes the outcomes from here (`Relay.take_broadcast`) while it answers.
        let id = shared.park(outcomes);
        let answer = delegate(shared, raw, head, Handed::Broadcast(id)).await;
        shared.unpark(id);
        return answer;
    };
    shared.state.lock().unwrap().calls_relayed += 1;
    let names: Vec<Arc<str>> = outcomes.iter().map(|o| o.name.clone()).collect();
    let replies = outcomes.into_iter().filter_map(|o| o.reply.ok()).collect();
    let body = envelope(fmt, &names, replies, results);
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {}\r\ncontent-length: {}\r\n\r\n",
        fmt.media(),
        body.len
    );
    Answer::with_parts(head.into_bytes(), body)
}

/// One replica's part of a broadcast: how long it took, and its answer or why none came. A
/// pooled connection the replica closed while idle never got the request: then once more on a
/// fresh one.
async fn send(
    shared: &Shared,
    addr: SocketAddr,
    pooled: Option<Upstream>,
    request: Vec<u8>,
    body: &[u8],
) -> (f64, Result<Exchanged, Failure>) {
    let started = Instant::now();
    let tls = shared.settings.tls.as_ref();
    let connect = shared.settings.connect_timeout;
    let was_pooled = pooled.is_some();
    let attempt = async {
        match exchange(pooled, addr, tls, (&request, body), connect).await {
            Err(Failure::Connect) if was_pooled => {
                exchange(None, addr, tls, (&request, body), connect).await
            }
            other => other,
        }
    };
    let outcome = match tokio::time::timeout(shared.request_timeout(), attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure::Timeout),
    };
    (started.elapsed().as_secs_f64(), outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::parse_response;

    fn reply(status: u16, content_type: &str, body: &[u8]) -> Received {
        let mut bytes = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body);
        let head = parse_response(&bytes).unwrap().unwrap();
        Received { bytes, head }
    }

    fn spliced(fmt: Format, replies: Vec<Received>) -> Option<Vec<u8>> {
        let results: Option<Vec<_>> = replies.iter().map(|r| result_of(fmt, r)).collect();
        let names: Vec<Arc<str>> = (0..replies.len())
            .map(|i| format!("r-{i}").into())
            .collect();
        Some(envelope(fmt, &names, replies, results?).concat())
    }

    #[test]
    fn endpoint_names_are_ascii_identifiers() {
        for ok in ["echo", "_x", "a1_b"] {
            assert!(is_endpoint_name(ok.as_bytes()), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a b", "a%20b", "é", "a?x=1", "a/b"] {
            assert!(!is_endpoint_name(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn json_replies_are_spliced() {
        let a = reply(200, "application/json", br#"{"result":[1,"x"]}"#);
        let b = reply(200, "application/json", br#"{"result":null}"#);
        let out = spliced(Format::Json, vec![a, b]).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"results": [[1, "x"], null], "replicas": ["r-0", "r-1"], "errors": {}})
        );
    }

    #[test]
    fn only_successes_in_the_callers_format_are_spliced() {
        let error = reply(404, "application/json", br#"{"error":{}}"#);
        assert!(spliced(Format::Json, vec![error]).is_none());
        let msgpack = reply(200, "application/msgpack", b"\x81\xa6result\xc0");
        assert!(spliced(Format::Json, vec![msgpack]).is_none());
        let other_shape = reply(200, "application/json", br#"{"results":1}"#);
        assert!(spliced(Format::Json, vec![other_shape]).is_none());
        let empty = reply(200, "application/json", b"");
        assert!(spliced(Format::Json, vec![empty]).is_none());
    }

    #[test]
    fn msgpack_replies_are_spliced() {
        let replies = (0..16)
            .map(|i| {
                reply(
                    200,
                    "application/msgpack",
                    &[0x81, 0xa6, b'r', b'e', b's', b'u', b'l', b't', i],
                )
            })
            .collect();
        let out = spliced(Format::Msgpack, replies).unwrap();
        // {"results": array16 of 16 fixints, ...}
        assert_eq!(&out[..12], b"\x83\xa7results\xdc\x00\x10");
        assert_eq!(&out[12..28], (0..16).collect::<Vec<u8>>());
        assert!(out.ends_with(b"\xa6errors\x80"));
    }

    #[test]
    fn binary_messages_are_aligned_in_the_envelope() {
        let (prefix, pads) = binary_prefix(b"skel", &[10, 70, 3]);
        assert_eq!(&prefix[..4], b"KFB\x01");
        assert_eq!(prefix.len(), 128); // 24 + 48 + 4, aligned
        assert_eq!(pads, [54, 58, 0]);
        let offsets: Vec<u64> = (0..3)
            .map(|i| u64::from_le_bytes(prefix[24 + 16 * i..32 + 16 * i].try_into().unwrap()))
            .collect();
        assert_eq!(offsets, [128, 192, 320]);
    }

    #[test]
    fn large_replies_are_not_copied() {
        let big = vec![b'7'; COPY_BELOW];
        let mut body = br#"{"result":"#.to_vec();
        body.extend_from_slice(&big);
        body.push(b'}');
        let replies = vec![reply(200, "application/json", &body)];
        let results: Vec<_> = replies
            .iter()
            .map(|r| result_of(Format::Json, r).unwrap())
            .collect();
        let parts = envelope(Format::Json, &["a".into()], replies, results);
        assert_eq!(parts.parts.len(), 3); // head, the reply's own buffer, tail
        assert_eq!(parts.len, parts.concat().len());
    }
}
