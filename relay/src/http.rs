//! The little of HTTP/1.1 the relay reads itself: request and response heads, via httparse.
//!
//! Anything unusual (chunked bodies, `Expect`, oversized bodies, a repeated or malformed
//! Content-Length, a repeated header the relay reads, bare-LF line ends, HTTP/1.0, methods
//! llhttp may not know, a head near the size limit, a head httparse rejects) is not handled
//! here: the connection is handed to the Python server, which answers it properly. So both call
//! paths give every such request the same answer.

use crate::names;

pub const MAX_HEADERS: usize = 64;
/// Longest request head accepted; longer ones get 431 (the body limit is `max_body`).
pub const MAX_HEAD: usize = 64 * 1024;
/// Heads longer than this are measured by the Python server's own rule, near the limit.
const LARGE_HEAD: usize = MAX_HEAD - 8 * 1024;
/// The methods the relay passes on itself; any other goes to the Python server whole.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];

pub struct RequestHead {
    pub head_len: usize,
    pub content_length: usize,
    pub is_call: bool,      // POST /v1/call/...
    pub is_broadcast: bool, // POST /v1/call_all/...
    pub keep_alive: bool,
    pub path: (usize, usize), // byte range of the path in the buffer
    pub auth: Option<(usize, usize)>,
    pub session: Option<(usize, usize)>,
    pub content_type: Option<(usize, usize)>,
    pub timeout: Option<(usize, usize)>,
    pub ranks: Option<(usize, usize)>,
}

pub enum Request {
    Partial,
    Head(RequestHead),
    /// Valid or not, not for the relay: the Python server takes the connection from here.
    HandOver,
}

fn range(buf: &[u8], part: &[u8]) -> (usize, usize) {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    (start, start + part.len())
}

/// A Content-Length value as llhttp accepts it: decimal digits only (no sign, no list).
fn content_length(value: &[u8]) -> Option<usize> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// Whether a comma-separated header value (`Connection: keep-alive, close`) lists `token`.
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether a header value names `media` (case-insensitively), as one of its media ranges.
fn contains(value: &[u8], media: &str) -> bool {
    value.split(|&b| b == b',').any(|range| {
        let media_range = range.split(|&b| b == b';').next().unwrap_or(b"");
        media_range
            .trim_ascii()
            .eq_ignore_ascii_case(media.as_bytes())
    })
}

/// Set a header the relay reads, once: a second one means the request is for Python.
fn once(slot: &mut Option<(usize, usize)>, buf: &[u8], value: &[u8]) -> bool {
    let first = slot.is_none();
    *slot = Some(range(buf, value));
    first
}

pub fn parse_request(buf: &[u8], max_body: usize) -> Request {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Request::Partial,
        Err(_) => return Request::HandOver,
    };
    let method = req.method.unwrap_or("");
    let path = req.path.unwrap_or("");
    if req.version != Some(1)
        || !METHODS.contains(&method)
        || head_len > LARGE_HEAD
        || buf[..head_len]
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r'))
    {
        return Request::HandOver;
    }
    if path.starts_with(names::PATHS_STREAM) {
        // A stream's answer goes out item by item, as the Python server writes it: the
        // connection is its own from here.
        return Request::HandOver;
    }
    let mut head = RequestHead {
        head_len,
        content_length: 0,
        is_call: method == "POST" && path.starts_with(names::PATHS_CALL),
        is_broadcast: method == "POST" && path.starts_with(names::PATHS_CALL_ALL),
        keep_alive: true,
        path: range(buf, path.as_bytes()),
        auth: None,
        session: None,
        content_type: None,
        timeout: None,
        ranks: None,
    };
    let mut length: Option<(usize, usize)> = None;
    for h in req.headers.iter() {
        let name = h.name;
        let fresh = if name.eq_ignore_ascii_case("content-length") {
            match content_length(h.value) {
                Some(n) if n <= max_body => head.content_length = n,
                _ => return Request::HandOver, // the server answers 400 or 413
            }
            once(&mut length, buf, h.value)
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            false
        } else if name.eq_ignore_ascii_case("accept") {
            // A broadcast answered as a stream: the Python server writes it item by item.
            if path.starts_with(names::PATHS_CALL_ALL) && contains(h.value, names::MEDIA_STREAM) {
                return Request::HandOver;
            }
            true
        } else if name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, b"close") {
                head.keep_alive = false;
            }
            true
        } else if name.eq_ignore_ascii_case("authorization") {
            once(&mut head.auth, buf, h.value)
        } else if name.eq_ignore_ascii_case(names::HEADERS_SESSION) {
            once(&mut head.session, buf, h.value)
        } else if name.eq_ignore_ascii_case("content-type") {
            once(&mut head.content_type, buf, h.value)
        } else if name.eq_ignore_ascii_case(names::HEADERS_TIMEOUT) {
            once(&mut head.timeout, buf, h.value)
        } else if name.eq_ignore_ascii_case(names::HEADERS_RANKS) {
            once(&mut head.ranks, buf, h.value)
        } else {
            true
        };
        if !fresh {
            return Request::HandOver;
        }
    }
    if head.content_length > names::LIMITS_STREAM_BODY {
        // Too large to hold: the Python call path streams it (and the rest of the connection).
        return Request::HandOver;
    }
    Request::Head(head)
}

pub struct ResponseHead {
    pub head_len: usize,
    pub status: u16,
    pub content_length: usize,
    pub keep_alive: bool,
    pub content_type: Option<(usize, usize)>, // byte range of its value in the buffer
    pub retryable: Option<Vec<u8>>,
    /// From the Python server only: "answer with the replica's own answer you hold".
    pub pass_on: bool,
}

/// A response head from a replica or the Python server, which always send Content-Length.
pub fn parse_response(buf: &[u8]) -> Result<Option<ResponseHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed response"),
    };
    let mut head = ResponseHead {
        head_len,
        status: resp.code.unwrap_or(0),
        content_length: usize::MAX,
        keep_alive: resp.version == Some(1),
        content_type: None,
        retryable: None,
        pass_on: false,
    };
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            head.content_length = content_length(h.value).ok_or("bad content-length")?;
        } else if h.name.eq_ignore_ascii_case("connection") {
            if has_token(h.value, b"close") {
                head.keep_alive = false;
            }
        } else if h.name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(range(buf, h.value));
        } else if h.name.eq_ignore_ascii_case(names::HEADERS_RETRYABLE) {
            head.retryable = Some(h.value.to_vec());
        } else if h.name.eq_ignore_ascii_case(names::HEADERS_RELAY_PASS) {
            head.pass_on = true;
        }
    }
    if head.content_length == usize::MAX {
        return Err("response without content-length");
    }
    Ok(Some(head))
}

/// What the relay tells Python about a replica's answer that is not the call's answer: the
/// replica refused the call before its actor saw it (`refused <ErrorType>`). Python decides
/// what happens next; the relay only reports.
pub fn refusal(head: &ResponseHead) -> Option<String> {
    let kind = head
        .retryable
        .as_deref()
        .filter(|kind| head.status == 503 && !kind.is_empty())?;
    Some(format!("refused {}", String::from_utf8_lossy(kind)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, max_body: usize) -> Option<RequestHead> {
        match parse_request(raw.as_bytes(), max_body) {
            Request::Head(h) => Some(h),
            _ => None,
        }
    }

    #[test]
    fn a_call_head_gives_its_parts() {
        let raw = "POST /v1/call/echo HTTP/1.1\r\nContent-Length: 2\r\nX-Kubeforge-Session: s\r\n\
                   authorization: Bearer t\r\ncontent-type: application/msgpack\r\n\r\n{}";
        let h = head(raw, 10).unwrap();
        assert!(h.is_call && h.keep_alive);
        assert_eq!(h.content_length, 2);
        assert_eq!(&raw[h.path.0..h.path.1], "/v1/call/echo");
        assert_eq!(&raw[h.session.unwrap().0..h.session.unwrap().1], "s");
        assert_eq!(&raw[h.auth.unwrap().0..h.auth.unwrap().1], "Bearer t");
    }

    #[test]
    fn keep_alive_follows_connection_tokens() {
        let close = "POST /v1/call/a HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(!head(close, 10).unwrap().keep_alive);
        let listed = "POST /v1/call/a HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n";
        assert!(!head(listed, 10).unwrap().keep_alive);
        let kept = "POST /v1/call/a HTTP/1.1\r\nConnection: keep-alive, closed\r\n\r\n";
        assert!(head(kept, 10).unwrap().keep_alive);
        assert!(
            !head("GET /v1/metrics HTTP/1.1\r\n\r\n", 10)
                .unwrap()
                .is_call
        );
    }

    #[test]
    fn heads_near_the_size_limit_are_for_python() {
        let pad = "a".repeat(LARGE_HEAD);
        let raw = format!("POST /v1/call/a HTTP/1.1\r\nx-pad: {pad}\r\n\r\n");
        assert!(matches!(
            parse_request(raw.as_bytes(), 10),
            Request::HandOver
        ));
    }

    #[test]
    fn partial_oversized_and_unusual_heads() {
        let partial = parse_request(b"POST /v1/call/a HTTP/1.1\r\nContent-", 10);
        assert!(matches!(partial, Request::Partial));
        for raw in [
            "POST /v1/call/a HTTP/1.1\r\nContent-Length: 11\r\n\r\n", // over max_body: 413
            "POST /v1/call/a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "POST /v1/call/a HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "POST /v1/call/a HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST /v1/call/a HTTP/1.1\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n",
            "POST /v1/call/a HTTP/1.1\r\nx-kubeforge-timeout: 1\r\nx-kubeforge-timeout: 2\r\n\r\n",
            "BAD\0 / HTTP/1.1\r\n\r\n",
            "POST /v1/call/a HTTP/1.0\r\n\r\n", // HTTP/1.0: Python's rules
            "BREW /v1/call/a HTTP/1.1\r\ncontent-length: 9\r\n\r\n", // llhttp refuses it
            "POST /v1/call/a HTTP/1.1\nContent-Length: 0\n\n", // bare LF
            "POST /v1/call/a HTTP/1.1\r\nA: b\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request(raw.as_bytes(), 10), Request::HandOver),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn responses_need_a_length_and_say_pass_on() {
        let ok = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(ok.is_some_and(|h| h.keep_alive && !h.pass_on && h.status == 200));
        let pass = b"HTTP/1.1 503 x\r\nx-kubeforge-relay-pass: 1\r\ncontent-length: 0\r\n\r\n";
        assert!(parse_response(pass).unwrap().unwrap().pass_on);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").unwrap().is_none());
    }
}
