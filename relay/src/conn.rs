//! One caller connection: read a request, relay it (to a replica, or to the Python server),
//! write the answer, repeat. Requests on one connection are answered in order.

use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::broadcast::{self, Parts};
use crate::http::{
    parse_request, parse_response, refusal, Request, RequestHead, ResponseHead, MAX_HEAD,
};
use crate::upstream::{Tls, Upstream};
use crate::{names, wire, Shared};

const READ_CHUNK: usize = 16 * 1024;
/// A request body below this is written with its head, in one write.
const SMALL_BODY: usize = 64 * 1024;
/// Slack on top of the request timeout for the Python server's own answer.
const SERVER_SLACK: Duration = Duration::from_secs(10);

/// Why a relayed call got no answer, as reported to Python, which decides what happens next.
#[derive(Clone, Copy)]
pub enum Failure {
    Connect, // never reached the replica
    Lost,    // the connection broke after the call was sent
    Timeout, // no answer within the request timeout
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Lost => "lost",
            Failure::Timeout => "timeout",
        }
    }
}

pub struct Answer {
    bytes: Vec<u8>,
    /// What follows `bytes`: a large answer written from the buffers it was received in.
    tail: Vec<(Vec<u8>, Range<usize>)>,
    close: bool,
    pass_on: bool, // Python's verdict: answer with the replica's answer the relay holds
}

impl Answer {
    fn whole(bytes: Vec<u8>, close: bool) -> Self {
        Answer {
            bytes,
            tail: Vec::new(),
            close,
            pass_on: false,
        }
    }

    /// A head and a body of parts: one write when it is small.
    pub fn with_parts(mut head: Vec<u8>, body: Parts) -> Self {
        if body.len < SMALL_BODY {
            body.append_to(&mut head);
            return Answer::whole(head, false);
        }
        Answer {
            bytes: head,
            tail: body.parts,
            close: false,
            pass_on: false,
        }
    }

    async fn write_to(&self, client: &mut TcpStream) -> std::io::Result<()> {
        client.write_all(&self.bytes).await?;
        for (buf, range) in &self.tail {
            client.write_all(&buf[range.clone()]).await?;
        }
        Ok(())
    }
}

/// What the Python server gets with a request the relay passes on.
pub enum Handed {
    Whole,          // the request as the caller sent it: Python answers it from the start
    Failed(String), // a call the relay relayed, and how that went (`index seconds report`)
    Broadcast(u64), // a broadcast sent: where its outcomes wait (`Shared::park`); no body
}

pub async fn serve(shared: Arc<Shared>, mut client: TcpStream, mut stop: watch::Receiver<bool>) {
    let _ = client.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        let mut pending: Option<RequestHead> = None;
        let head = loop {
            if pending.is_none() && !buf.is_empty() {
                match parse_request(&buf, shared.settings.max_body) {
                    Request::Head(h) => pending = Some(h),
                    Request::Partial if buf.len() > MAX_HEAD => {
                        let _ = client.write_all(&head_too_large()).await;
                        return;
                    }
                    Request::Partial => {}
                    Request::HandOver => return hand_over(&shared, client, buf).await,
                }
            }
            if let Some(h) = pending.take_if(|h| buf.len() >= h.head_len + h.content_length) {
                break h;
            }
            // The whole body's room at once once its length is known: no copy as it grows.
            let wanted = pending
                .as_ref()
                .map_or(0, |h| h.head_len + h.content_length);
            buf.reserve(READ_CHUNK.max(wanted.saturating_sub(buf.len())));
            let read = if buf.is_empty() {
                // Idle between requests: the only moment a stopping relay may close it.
                tokio::select! {
                    r = client.read_buf(&mut buf) => r,
                    _ = stop.changed() => return,
                }
            } else {
                client.read_buf(&mut buf).await
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        };
        shared.busy.fetch_add(1, Ordering::SeqCst);
        let total = head.head_len + head.content_length;
        let answer = answer(&shared, &buf[..total], &head).await;
        let written = answer.write_to(&mut client).await;
        shared.busy.fetch_sub(1, Ordering::SeqCst);
        buf.drain(..total);
        if written.is_err() || answer.close || !head.keep_alive || *stop.borrow() {
            return;
        }
    }
}

fn slice(buf: &[u8], range: Option<(usize, usize)>) -> Option<&[u8]> {
    range.map(|(a, b)| &buf[a..b])
}

async fn answer(shared: &Arc<Shared>, raw: &[u8], head: &RequestHead) -> Answer {
    if head.is_broadcast && head.keep_alive {
        return broadcast::answer(shared, raw, head).await;
    }
    if !head.is_call || !head.keep_alive {
        return delegate(shared, raw, head, Handed::Whole).await;
    }
    let session = slice(raw, head.session);
    let target = {
        let mut state = shared.state.lock().unwrap();
        if !state.tokens.allows(slice(raw, head.auth).unwrap_or(b"")) {
            None // the Python server answers 401
        } else {
            let index = match session {
                None => state.pick(),
                Some(sid) => state.sticky(&shared.settings.session_key, sid),
            };
            index
                .and_then(|i| {
                    let r = state.slot(i)?;
                    r.in_flight += 1;
                    let pooled = std::iter::from_fn(|| r.idle.pop()).find(Upstream::still_open);
                    Some((i, r.addr, r.host_header.clone(), pooled))
                })
                .map(|picked| (picked, state.tokens.line.clone()))
        }
    };
    let Some(((index, addr, host, pooled), auth_line)) = target else {
        return delegate(shared, raw, head, Handed::Whole).await;
    };

    let path = &raw[head.path.0..head.path.1];
    let request = upstream_head(&auth_line, raw, head, path, &host, session);
    let body = &raw[head.head_len..head.head_len + head.content_length];
    let started = Instant::now();
    let timeout = shared.request_timeout();
    let connect = shared.settings.connect_timeout;
    let tls = shared.settings.tls.as_ref();
    let sent = exchange(pooled, addr, tls, (&request, body), connect);
    let outcome = tokio::time::timeout(timeout, sent).await;
    let seconds = started.elapsed().as_secs_f64();
    let (report, held) = match outcome {
        Ok(Ok(Exchanged {
            bytes,
            head: resp,
            conn,
            reusable,
        })) => {
            let refused = refusal(&resp);
            {
                let mut state = shared.state.lock().unwrap();
                state.record(index, seconds, resp.status < 400);
                if reusable {
                    state.put_idle(index, addr, conn);
                }
                if refused.is_none() {
                    state.calls_relayed += 1;
                }
            }
            match refused {
                // A replica that closes after its answer makes the caller reconnect too, so a
                // call pipelined behind this one is never relayed after a `close`.
                None => return Answer::whole(bytes, !resp.keep_alive),
                Some(report) => (report, Some((bytes, !resp.keep_alive))),
            }
        }
        Ok(Err(failure)) => (failure.as_str().to_string(), None),
        Err(_) => (Failure::Timeout.as_str().to_string(), None),
    };
    if held.is_none() {
        shared.state.lock().unwrap().record(index, seconds, false);
    }
    // Python goes on from here: which replica, how long the attempt took, what happened.
    let failed = format!("{index} {seconds:.6} {report}");
    let answer = delegate(shared, raw, head, Handed::Failed(failed)).await;
    match held {
        // Python decided the replica's own refusal is the caller's answer.
        Some((bytes, close)) if answer.pass_on => Answer::whole(bytes, close),
        _ => answer,
    }
}

/// The head of the call as the replica gets it at `path` (the body follows unchanged): token,
/// type, deadline, ranks asked for and session.
pub fn upstream_head(
    auth_line: &[u8],
    raw: &[u8],
    head: &RequestHead,
    path: &[u8],
    host: &str,
    session: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(head.content_length.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(auth_line);
    for (name, value) in [
        ("content-type", slice(raw, head.content_type)),
        (names::HEADERS_TIMEOUT, slice(raw, head.timeout)),
        (names::HEADERS_RANKS, slice(raw, head.ranks)),
        (names::HEADERS_SESSION, session),
    ] {
        if let Some(value) = value {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

pub struct Exchanged {
    pub bytes: Vec<u8>, // the response exactly as received, nothing after it
    pub head: ResponseHead,
    pub conn: Upstream,
    pub reusable: bool, // keep-alive, and nothing arrived beyond the response
}

/// Send one request (its head, then its body) and read its complete response.
pub async fn exchange(
    pooled: Option<Upstream>,
    addr: SocketAddr,
    tls: Option<&Tls>,
    (head, body): (&[u8], &[u8]),
    connect_timeout: Duration,
) -> Result<Exchanged, Failure> {
    let mut conn = match pooled {
        Some(conn) => conn,
        None => tokio::time::timeout(connect_timeout, Upstream::connect(addr, tls))
            .await
            .map_err(|_| Failure::Connect)?
            .map_err(|_| Failure::Connect)?,
    };
    // A small request goes out in one write (one segment); a large body is written from where
    // it was received, never copied behind its head.
    let written = if body.len() < SMALL_BODY {
        conn.write_all(&[head, body].concat()).await
    } else {
        match conn.write_all(head).await {
            Ok(()) => conn.write_all(body).await,
            failed => failed,
        }
    };
    if written.is_err() {
        // A pooled connection the peer closed while idle: the request cannot have been read.
        return Err(Failure::Connect);
    }
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        buf.reserve(READ_CHUNK);
        match conn.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return Err(Failure::Lost),
            Ok(_) => {}
        }
        match parse_response(&buf) {
            Ok(Some(head)) => {
                let total = head.head_len + head.content_length;
                while buf.len() < total {
                    buf.reserve(total - buf.len());
                    match conn.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return Err(Failure::Lost),
                        Ok(_) => {}
                    }
                }
                let reusable = head.keep_alive && buf.len() == total;
                buf.truncate(total);
                return Ok(Exchanged {
                    bytes: buf,
                    head,
                    conn,
                    reusable,
                });
            }
            Ok(None) if buf.len() > MAX_HEAD => return Err(Failure::Lost),
            Ok(None) => {}
            Err(_) => return Err(Failure::Lost),
        }
    }
}

/// Pass a request to the Python server, marked as coming from this relay, with what the relay
/// did with it (`handed`). The caller's own `x-kubeforge-relay-*` headers are dropped so no one
/// can speak for the relay.
pub async fn delegate(shared: &Shared, raw: &[u8], head: &RequestHead, handed: Handed) -> Answer {
    if head.is_call || head.is_broadcast {
        shared.state.lock().unwrap().calls_handed_over += 1;
    }
    // The head is written anew, line by line, with CRLF endings whatever the caller used.
    let mut out = Vec::with_capacity(head.head_len + 128);
    let mut lines = raw[..head.head_len]
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty());
    if let Some(request_line) = lines.next() {
        out.extend_from_slice(request_line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&shared.settings.secret_line);
    let mut body = &raw[head.head_len..];
    match &handed {
        Handed::Whole => {}
        Handed::Failed(failed) => {
            let failed = format!("{}: {failed}\r\n", names::HEADERS_RELAY_FAILED);
            out.extend_from_slice(failed.as_bytes());
        }
        Handed::Broadcast(id) => {
            let line = format!(
                "{}: {id}\r\ncontent-length: 0\r\n",
                names::HEADERS_RELAY_BROADCAST
            );
            out.extend_from_slice(line.as_bytes());
            body = b"";
        }
    }
    let new_length = matches!(handed, Handed::Broadcast(_));
    let prefix = names::HEADERS_RELAY_PREFIX.as_bytes();
    for line in lines {
        let named =
            |name: &[u8]| line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name);
        if named(prefix) || (new_length && named(b"content-length:")) {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let request = (out.as_slice(), body);
    let backend = shared.settings.backend;
    let connect = shared.settings.connect_timeout;
    let timeout = shared.request_timeout() + SERVER_SLACK;
    let pooled = {
        let mut state = shared.state.lock().unwrap();
        std::iter::from_fn(|| state.backend_idle.pop()).find(Upstream::still_open)
    };
    let attempt = async {
        // A pooled connection the server closed meanwhile never got the request: then once
        // more on a fresh one.
        match pooled {
            Some(conn) => match exchange(Some(conn), backend, None, request, connect).await {
                Err(Failure::Connect) => exchange(None, backend, None, request, connect).await,
                other => other,
            },
            None => exchange(None, backend, None, request, connect).await,
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(done)) => {
            if done.reusable {
                let mut state = shared.state.lock().unwrap();
                if state.backend_idle.len() < 64 {
                    state.backend_idle.push(done.conn);
                }
            }
            Answer {
                pass_on: done.head.pass_on,
                ..Answer::whole(done.bytes, !done.head.keep_alive)
            }
        }
        _ => Answer::whole(server_gone(msgpack_caller(raw, head)), true),
    }
}

/// A complete error answer in the wire protocol's shape, in the caller's body format; the
/// connection closes after it.
fn error_response(status: &str, kind: &str, message: &str, msgpack: bool) -> Vec<u8> {
    let (body, content_type) = if msgpack {
        (wire::msgpack_error(kind, message), wire::MSGPACK)
    } else {
        (wire::json_error(kind, message), wire::JSON)
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Whether the caller sent msgpack, so errors answer in msgpack (as Python's `is_msgpack`).
fn msgpack_caller(raw: &[u8], head: &RequestHead) -> bool {
    slice(raw, head.content_type).is_some_and(wire::is_msgpack)
}

/// The answer when the router's own Python server cannot be reached (it is stopping).
fn server_gone(msgpack: bool) -> Vec<u8> {
    error_response(
        "503 Service Unavailable",
        "NoHealthyReplicasError",
        "the router's server did not answer",
        msgpack,
    )
}

/// The head was never parsed, so its content type is unknown: this answer is JSON, as the
/// Python server's own 431 is.
fn head_too_large() -> Vec<u8> {
    let message = format!("request head exceeds {MAX_HEAD} bytes");
    error_response(
        "431 Request Header Fields Too Large",
        "HeadTooLargeError",
        &message,
        false,
    )
}

/// Give the connection to the Python server: its socket, and the bytes read from it so far.
async fn hand_over(shared: &Shared, client: TcpStream, buf: Vec<u8>) {
    if let Ok(socket) = client.into_std() {
        shared.hand_over(OwnedFd::from(socket), buf);
    }
}
