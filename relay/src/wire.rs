//! The relay's own error answers, in the wire protocol's shape and the caller's body format
//! (DESIGN §4: `{"error": {"type", "message"}}`, JSON or msgpack as the request was).

pub const JSON: &str = "application/json";
pub const MSGPACK: &str = "application/msgpack";

/// As Python's `wire.is_msgpack`: the media type, parameters ignored, case-insensitive.
pub fn is_msgpack(content_type: &[u8]) -> bool {
    let media = content_type.split(|&b| b == b';').next().unwrap_or(b"");
    let media = media.trim_ascii();
    media.eq_ignore_ascii_case(MSGPACK.as_bytes())
        || media.eq_ignore_ascii_case(b"application/x-msgpack")
}

pub fn json_error(kind: &str, message: &str) -> Vec<u8> {
    let mut out = String::from(r#"{"error":{"type":"#);
    json_string(&mut out, kind);
    out.push_str(r#","message":"#);
    json_string(&mut out, message);
    out.push_str("}}");
    out.into_bytes()
}

fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

pub fn msgpack_error(kind: &str, message: &str) -> Vec<u8> {
    let mut out = vec![0x81]; // a map of one: "error"
    msgpack_str(&mut out, "error");
    out.push(0x82); // a map of two: "type", "message"
    msgpack_str(&mut out, "type");
    msgpack_str(&mut out, kind);
    msgpack_str(&mut out, "message");
    msgpack_str(&mut out, message);
    out
}

fn msgpack_str(out: &mut Vec<u8>, text: &str) {
    let n = text.len();
    match n {
        0..=31 => out.push(0xa0 | n as u8),
        32..=255 => out.extend_from_slice(&[0xd9, n as u8]),
        256..=65535 => {
            out.push(0xda);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdb);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_in_both_formats() {
        assert_eq!(
            json_error("E", "a \"b\"\n"),
            br#"{"error":{"type":"E","message":"a \"b\"\u000a"}}"#
        );
        let packed = msgpack_error("NoHealthyReplicasError", &"x".repeat(40));
        assert_eq!(
            &packed[..8],
            &[0x81, 0xa5, b'e', b'r', b'r', b'o', b'r', 0x82]
        );
        assert_eq!(&packed[packed.len() - 42..packed.len() - 40], &[0xd9, 40]);
    }

    #[test]
    fn msgpack_media_types() {
        assert!(is_msgpack(b"application/msgpack"));
        assert!(is_msgpack(b" Application/X-Msgpack ; charset=x"));
        assert!(!is_msgpack(b"application/json"));
        assert!(!is_msgpack(b""));
    }
}
