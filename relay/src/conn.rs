//! One caller connection: read a request, relay it (to a replica, or to the Python server),
//! write the answer, repeat. Requests on one connection are answered in order.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::http::{parse_request, parse_response, Request, RequestHead, ResponseHead};
use crate::Shared;

const READ_CHUNK: usize = 16 * 1024;

/// Why a relayed call did not produce an answer to pass on; Python decides what happens next.
#[derive(Clone, Copy)]
enum Failure {
    Connect, // never reached the replica: safe to send elsewhere
    Lost,    // the connection broke after the call was sent
    Timeout, // no answer within the request timeout
}

impl Failure {
    fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Lost => "lost",
            Failure::Timeout => "timeout",
        }
    }
}

struct Answer {
    bytes: Vec<u8>,
    close: bool,
}

pub async fn serve(shared: Arc<Shared>, mut client: TcpStream, mut stop: watch::Receiver<bool>) {
    let _ = client.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        let head = loop {
            if !buf.is_empty() {
                match parse_request(&buf, shared.settings.max_body) {
                    Request::Head(h) if buf.len() >= h.head_len + h.content_length => break h,
                    Request::Head(_) | Request::Partial => {}
                    Request::HandOver => return hand_over(&shared, client, buf).await,
                }
            }
            buf.reserve(READ_CHUNK);
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
        let written = client.write_all(&answer.bytes).await;
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

async fn answer(shared: &Shared, raw: &[u8], head: &RequestHead) -> Answer {
    if !head.is_call || !head.keep_alive {
        return delegate(shared, raw, head, None).await;
    }
    let session = slice(raw, head.session);
    let target = {
        let mut state = shared.state.lock().unwrap();
        let auth = shared.settings.auth.as_deref();
        if auth.is_some_and(|want| slice(raw, head.auth) != Some(want)) {
            None // the Python server answers 401
        } else {
            let index = match session {
                None => state.pick(),
                Some(sid) => state.sticky(&shared.settings.session_key, sid),
            };
            index.and_then(|i| {
                let r = state.slot(i)?;
                r.in_flight += 1;
                let pooled = std::iter::from_fn(|| r.idle.pop()).find(still_open);
                Some((i, r.addr, r.host_header.clone(), pooled))
            })
        }
    };
    let Some((index, addr, host, pooled)) = target else {
        return delegate(shared, raw, head, None).await;
    };

    let request = upstream_request(shared, raw, head, &host, session);
    let started = Instant::now();
    let timeout = shared.state.lock().unwrap().request_timeout;
    let outcome = tokio::time::timeout(timeout, exchange(pooled, addr, &request)).await;
    let seconds = started.elapsed().as_secs_f64();
    let failure = match outcome {
        Ok(Ok((bytes, resp, conn))) => {
            let retry = {
                let mut state = shared.state.lock().unwrap();
                state.record(index, seconds, resp.status < 400);
                if resp.keep_alive {
                    state.put_idle(index, addr, conn);
                }
                // Overloaded or draining: the actor never saw the call, so Python may send it
                // elsewhere (a session leaves its replica only when it drains).
                resp.status == 503
                    && resp
                        .retryable
                        .as_deref()
                        .is_some_and(|kind| session.is_none() || kind == b"DrainingError")
                    && state.healthy_count() > 1
            };
            if !retry {
                shared.state.lock().unwrap().calls_relayed += 1;
                return Answer {
                    bytes,
                    close: false,
                };
            }
            let kind = String::from_utf8_lossy(resp.retryable.as_deref().unwrap_or(b""));
            let failed = Some((index, format!("retryable {kind}")));
            return delegate(shared, raw, head, failed).await;
        }
        Ok(Err(failure)) => failure,
        Err(_) => Failure::Timeout,
    };
    shared.state.lock().unwrap().record(index, seconds, false);
    delegate(
        shared,
        raw,
        head,
        Some((index, failure.as_str().to_string())),
    )
    .await
}

/// The call as the replica gets it: same path and body; token, type, deadline and session.
fn upstream_request(
    shared: &Shared,
    raw: &[u8],
    head: &RequestHead,
    host: &str,
    session: Option<&[u8]>,
) -> Vec<u8> {
    let body = &raw[head.head_len..head.head_len + head.content_length];
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(&raw[head.path.0..head.path.1]);
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&shared.settings.upstream_auth);
    for (name, value) in [
        (&b"content-type: "[..], slice(raw, head.content_type)),
        (&b"x-kubeforge-timeout: "[..], slice(raw, head.timeout)),
        (&b"x-kubeforge-session: "[..], session),
    ] {
        if let Some(value) = value {
            out.extend_from_slice(name);
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// Send one request and read its complete response: (raw response, head, the connection).
async fn exchange(
    pooled: Option<TcpStream>,
    addr: SocketAddr,
    request: &[u8],
) -> Result<(Vec<u8>, ResponseHead, TcpStream), Failure> {
    let mut conn = match pooled {
        Some(conn) => conn,
        None => {
            let conn = TcpStream::connect(addr)
                .await
                .map_err(|_| Failure::Connect)?;
            let _ = conn.set_nodelay(true);
            conn
        }
    };
    if conn.write_all(request).await.is_err() {
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
                let keep = head.keep_alive && buf.len() == total;
                let head = ResponseHead {
                    keep_alive: keep,
                    ..head
                };
                return Ok((buf, head, conn));
            }
            Ok(None) => {}
            Err(_) => return Err(Failure::Lost),
        }
    }
}

/// Pass a request to the Python server, marked as coming from this relay, with what went
/// wrong when a relayed attempt failed. The caller's own `x-kubeforge-relay-*` headers are
/// dropped so no one can speak for the relay.
async fn delegate(
    shared: &Shared,
    raw: &[u8],
    head: &RequestHead,
    failed: Option<(u32, String)>,
) -> Answer {
    if head.is_call {
        shared.state.lock().unwrap().calls_handed_over += 1;
    }
    let head_bytes = &raw[..head.head_len];
    let mut out = Vec::with_capacity(raw.len() + 128);
    let mut lines = head_bytes.split(|&b| b == b'\n');
    if let Some(request_line) = lines.next() {
        out.extend_from_slice(request_line);
        out.push(b'\n');
    }
    out.extend_from_slice(&shared.settings.secret_line);
    if let Some((index, kind)) = failed {
        out.extend_from_slice(format!("x-kubeforge-relay-failed: {index} {kind}\r\n").as_bytes());
    }
    for line in lines {
        if line.len() >= 18 && line[..18].eq_ignore_ascii_case(b"x-kubeforge-relay-") {
            continue;
        }
        if !line.is_empty() {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out.extend_from_slice(&raw[head.head_len..]);
    let backend = shared.settings.backend;
    let pooled = {
        let mut state = shared.state.lock().unwrap();
        std::iter::from_fn(|| state.backend_idle.pop()).find(still_open)
    };
    // A pooled connection may have been closed by the server meanwhile: then try a fresh one.
    let first = match pooled {
        Some(conn) => exchange(Some(conn), backend, &out).await.ok(),
        None => None,
    };
    let result = match first {
        Some(ok) => Ok(ok),
        None => exchange(None, backend, &out).await,
    };
    match result {
        Ok((bytes, resp, conn)) => {
            if resp.keep_alive {
                let mut state = shared.state.lock().unwrap();
                if state.backend_idle.len() < 64 {
                    state.backend_idle.push(conn);
                }
            }
            Answer {
                bytes,
                close: !resp.keep_alive,
            }
        }
        Err(_) => Answer {
            bytes: server_gone(),
            close: true,
        },
    }
}

/// The answer when the router's own Python server cannot be reached (it is stopping).
fn server_gone() -> Vec<u8> {
    let body =
        br#"{"error": {"type": "NoHealthyReplicasError", "message": "the router is stopping"}}"#;
    let mut out = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A pooled connection still usable: no EOF, reset or stray bytes arrived while it was idle.
pub fn still_open(conn: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(conn.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Give the rest of the connection to the Python server as a byte tunnel.
async fn hand_over(shared: &Shared, mut client: TcpStream, buf: Vec<u8>) {
    let backend = shared.settings.backend;
    let Ok(mut server) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    if server.write_all(&buf).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
