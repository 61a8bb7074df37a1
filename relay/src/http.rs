//! The little of HTTP/1.1 the relay reads itself: request and response heads, via httparse.
//!
//! Anything unusual (chunked bodies, `Expect`, oversized bodies, a head httparse rejects) is not
//! handled here: the connection is handed to the Python server, which answers it properly.

pub const MAX_HEADERS: usize = 64;

pub struct RequestHead {
    pub head_len: usize,
    pub content_length: usize,
    pub is_call: bool, // POST /v1/call/...
    pub keep_alive: bool,
    pub path: (usize, usize), // byte range of the path in the buffer
    pub auth: Option<(usize, usize)>,
    pub session: Option<(usize, usize)>,
    pub content_type: Option<(usize, usize)>,
    pub timeout: Option<(usize, usize)>,
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
    let mut head = RequestHead {
        head_len,
        content_length: 0,
        is_call: method == "POST" && path.starts_with("/v1/call/"),
        keep_alive: req.version == Some(1),
        path: range(buf, path.as_bytes()),
        auth: None,
        session: None,
        content_type: None,
        timeout: None,
    };
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) if n <= max_body => head.content_length = n,
                _ => return Request::HandOver, // the server answers 400 or 413
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("expect")
            || name.eq_ignore_ascii_case("upgrade")
        {
            return Request::HandOver;
        } else if name.eq_ignore_ascii_case("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                head.keep_alive = false;
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            head.auth = Some(range(buf, h.value));
        } else if name.eq_ignore_ascii_case("x-kubeforge-session") {
            head.session = Some(range(buf, h.value));
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(range(buf, h.value));
        } else if name.eq_ignore_ascii_case("x-kubeforge-timeout") {
            head.timeout = Some(range(buf, h.value));
        }
    }
    Request::Head(head)
}

pub struct ResponseHead {
    pub head_len: usize,
    pub status: u16,
    pub content_length: usize,
    pub keep_alive: bool,
    pub retryable: Option<Vec<u8>>,
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
        retryable: None,
    };
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            head.content_length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("bad content-length")?;
        } else if h.name.eq_ignore_ascii_case("connection") {
            if h.value.eq_ignore_ascii_case(b"close") {
                head.keep_alive = false;
            }
        } else if h.name.eq_ignore_ascii_case("x-kubeforge-retryable") {
            head.retryable = Some(h.value.to_vec());
        }
    }
    if head.content_length == usize::MAX {
        return Err("response without content-length");
    }
    Ok(Some(head))
}
