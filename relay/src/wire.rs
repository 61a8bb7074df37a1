//! The body formats as far as the relay writes them: its own error answers, in the wire
//! protocol's shape and the caller's body format (DESIGN §4: `{"error": {"type", "message"}}`,
//! JSON or msgpack as the request was), and the msgpack pieces a broadcast's answer is made of.

use crate::names;

pub const JSON: &str = names::MEDIA_JSON;
pub const MSGPACK: &str = names::MEDIA_MSGPACK;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Msgpack,
    Binary,
}

/// As Python's `wire.body_format`: the format a Content-Type names (parameters ignored,
/// case-insensitive); JSON when it names none kubeforge knows, or there is none.
pub fn body_format(content_type: Option<&[u8]>) -> Format {
    let media = content_type
        .unwrap_or(b"")
        .split(|&b| b == b';')
        .next()
        .unwrap_or(b"")
        .trim_ascii();
    if media.eq_ignore_ascii_case(MSGPACK.as_bytes())
        || media.eq_ignore_ascii_case(b"application/x-msgpack")
    {
        Format::Msgpack
    } else if media.eq_ignore_ascii_case(names::MEDIA_BINARY.as_bytes()) {
        Format::Binary
    } else {
        Format::Json
    }
}

impl Format {
    pub fn media(self) -> &'static str {
        match self {
            Format::Json => JSON,
            Format::Msgpack => MSGPACK,
            Format::Binary => names::MEDIA_BINARY,
        }
    }
}

/// As Python's `wire.is_msgpack`.
pub fn is_msgpack(content_type: &[u8]) -> bool {
    body_format(Some(content_type)) == Format::Msgpack
}

pub fn json_error(kind: &str, message: &str) -> Vec<u8> {
    let mut out = String::from(r#"{"error":{"type":"#);
    json_string(&mut out, kind);
    out.push_str(r#","message":"#);
    json_string(&mut out, message);
    out.push_str("}}");
    out.into_bytes()
}

/// A JSON string as Python's `json.dumps` writes it (`ensure_ascii`): the same text, so both
/// call paths answer byte for byte alike.
pub fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
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

/// msgpack's encodings as Python's `msgpack.packb(use_bin_type=True)` picks them: the shortest.
pub fn msgpack_str(out: &mut Vec<u8>, text: &str) {
    let n = text.len();
    match n {
        0..=31 => out.push(0xa0 | n as u8),
        32..=255 => out.extend_from_slice(&[0xd9, n as u8]),
        _ => sized(out, n, [0, 0xda, 0xdb]),
    }
    out.extend_from_slice(text.as_bytes());
}

pub fn msgpack_array(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=15 => out.push(0x90 | n as u8),
        _ => sized(out, n, [0, 0xdc, 0xdd]),
    }
}

pub fn msgpack_map(out: &mut Vec<u8>, n: usize) {
    match n {
        0..=15 => out.push(0x80 | n as u8),
        _ => sized(out, n, [0, 0xde, 0xdf]),
    }
}

pub fn msgpack_uint(out: &mut Vec<u8>, n: u64) {
    match n {
        0..=127 => out.push(n as u8),
        128..=255 => out.extend_from_slice(&[0xcc, n as u8]),
        256..=65535 => {
            out.push(0xcd);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        65536..=0xffff_ffff => {
            out.push(0xce);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

pub fn msgpack_ext(out: &mut Vec<u8>, code: i8, data: &[u8]) {
    let fixed = match data.len() {
        1 => Some(0xd4),
        2 => Some(0xd5),
        4 => Some(0xd6),
        8 => Some(0xd7),
        16 => Some(0xd8),
        _ => None,
    };
    match (fixed, data.len()) {
        (Some(tag), _) => out.push(tag),
        (None, n @ 0..=255) => out.extend_from_slice(&[0xc7, n as u8]),
        (None, n) => sized(out, n, [0, 0xc8, 0xc9]),
    }
    out.push(code as u8);
    out.extend_from_slice(data);
}

/// A length after its tag: `tags[1]` with 16 bits, `tags[2]` with 32.
fn sized(out: &mut Vec<u8>, n: usize, tags: [u8; 3]) {
    if n <= 0xffff {
        out.push(tags[1]);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(tags[2]);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_in_both_formats() {
        assert_eq!(
            json_error("E", "a \"b\"\né😀\u{1}"),
            br#"{"error":{"type":"E","message":"a \"b\"\n\u00e9\ud83d\ude00\u0001"}}"#
        );
        let packed = msgpack_error("NoHealthyReplicasError", &"x".repeat(40));
        assert_eq!(
            &packed[..8],
            &[0x81, 0xa5, b'e', b'r', b'r', b'o', b'r', 0x82]
        );
        assert_eq!(&packed[packed.len() - 42..packed.len() - 40], &[0xd9, 40]);
    }

    #[test]
    fn msgpack_as_python_packs_it() {
        let mut out = Vec::new();
        msgpack_array(&mut out, 16);
        msgpack_uint(&mut out, 300);
        msgpack_ext(&mut out, 11, &[5]);
        msgpack_ext(&mut out, 11, &[0xcd, 1, 0]);
        assert_eq!(
            out,
            [0xdc, 0, 16, 0xcd, 1, 44, 0xd4, 11, 5, 0xc7, 3, 11, 0xcd, 1, 0]
        );
    }

    #[test]
    fn body_formats() {
        assert_eq!(body_format(None), Format::Json);
        assert_eq!(body_format(Some(b"text/plain")), Format::Json);
        assert_eq!(
            body_format(Some(b"Application/X-Kubeforge; v=1")),
            Format::Binary
        );
        assert_eq!(body_format(Some(b"application/msgpack")), Format::Msgpack);
    }

    #[test]
    fn msgpack_media_types() {
        assert!(is_msgpack(b"application/msgpack"));
        assert!(is_msgpack(b" Application/X-Msgpack ; charset=x"));
        assert!(!is_msgpack(b"application/json"));
        assert!(!is_msgpack(b""));
    }
}
