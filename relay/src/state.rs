//! What the relay knows about replicas, pushed from Python, and what it measured, pulled back.
//!
//! Python's routing table stays the authority (health, sessions, placement); this is its
//! read-mostly copy for the hot path, plus the relay's own in-flight counts and call tallies.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::names;
use crate::tally::{Scale, Tally};
use crate::upstream::{Tls, Upstream};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Idle keep-alive connections kept per upstream.
const MAX_IDLE: usize = 256;

pub struct Replica {
    pub index: u32,
    pub addr: SocketAddr,
    pub host_header: String,
    pub healthy: bool,
    pub instance: String,
    pub name: Arc<str>, // as a broadcast's answer names it
    /// Load others put on it, as Python last computed it (its own calls + other routers').
    pub external: i64,
    /// Calls this relay has open to it now.
    pub in_flight: i64,
    pub idle: Vec<Upstream>,
}

/// A replica as Python pushes it (`set_replicas`).
pub struct Row {
    pub index: u32,
    pub addr: SocketAddr,
    pub healthy: bool,
    pub instance: String,
    pub name: String,
    /// Load others put on it (see `Replica::external`).
    pub external: i64,
}

/// What never changes while the relay runs.
pub struct Settings {
    pub backend: SocketAddr,
    pub secret_line: Vec<u8>, // the header line that tells Python a request came from here
    pub session_key: Vec<u8>,
    pub tls: Option<Tls>, // to replicas (the backend, on loopback, is always plain)
    pub max_body: usize,
    pub connect_timeout: Duration,
}

impl Settings {
    pub fn new(
        backend: SocketAddr,
        secret: &str,
        session_key: String,
        tls: Option<Tls>,
        max_body: usize,
        connect_timeout: Duration,
    ) -> Self {
        Settings {
            backend,
            secret_line: format!("{}: {secret}\r\n", names::HEADERS_RELAY_SECRET).into_bytes(),
            session_key: session_key.into_bytes(),
            tls,
            max_body,
            connect_timeout,
        }
    }
}

/// The shared token as Python last gave it (`set_tokens`: a rotation changes it while the relay
/// runs). Python decides which tokens count; the relay only compares.
pub struct Tokens {
    accept: Vec<Vec<u8>>, // the exact `Authorization` values a caller may send; none: no check
    pub line: Arc<[u8]>,  // the header line the relay adds towards replicas
}

impl Tokens {
    pub fn new(accept: Vec<String>, send: Option<String>) -> Self {
        Tokens {
            accept: accept
                .iter()
                .map(|t| format!("Bearer {t}").into_bytes())
                .collect(),
            line: match send {
                Some(t) => format!("authorization: Bearer {t}\r\n").into_bytes().into(),
                None => Arc::from(&b""[..]),
            },
        }
    }

    /// Whether a caller's `Authorization` value is accepted: every candidate is compared, each
    /// in constant time.
    pub fn allows(&self, got: &[u8]) -> bool {
        self.accept.is_empty()
            || self
                .accept
                .iter()
                .fold(false, |ok, want| ok | same(got, want))
    }
}

/// Constant-time comparison, for the caller's token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub struct State {
    pub tokens: Tokens,
    pub replicas: Vec<Replica>, // in index order
    /// Relayed calls per replica index since Python last drained them (bounded: a tally's
    /// size does not grow with its calls).
    pub tallies: BTreeMap<u32, Tally>,
    scale: Scale,
    pub backend_idle: Vec<Upstream>,
    pub calls_relayed: u64, // calls (and broadcasts) answered by replicas through the relay
    pub calls_handed_over: u64, // those passed to the Python server (decisions, failures)
    turn: usize,
}

impl State {
    pub fn new(tokens: Tokens, scale: Scale) -> Self {
        State {
            tokens,
            replicas: Vec::new(),
            tallies: BTreeMap::new(),
            scale,
            backend_idle: Vec::new(),
            calls_relayed: 0,
            calls_handed_over: 0,
            turn: 0,
        }
    }

    /// Replace the replica list, keeping pooled connections and in-flight counts of replicas
    /// that stay at the same address.
    pub fn set_replicas(&mut self, update: Vec<Row>) {
        let mut old: HashMap<u32, Replica> =
            self.replicas.drain(..).map(|r| (r.index, r)).collect();
        for row in update {
            let (in_flight, idle) = match old.remove(&row.index) {
                Some(r) if r.addr == row.addr => (r.in_flight, r.idle),
                _ => (0, Vec::new()),
            };
            self.replicas.push(Replica {
                index: row.index,
                addr: row.addr,
                host_header: row.addr.to_string(),
                healthy: row.healthy,
                instance: row.instance,
                name: row.name.into(),
                external: row.external,
                in_flight,
                idle,
            });
        }
        self.replicas.sort_by_key(|r| r.index);
    }

    pub fn slot(&mut self, index: u32) -> Option<&mut Replica> {
        self.replicas.iter_mut().find(|r| r.index == index)
    }

    /// Least-loaded healthy replica, ties broken by a rotating start (as Python's `pick`).
    pub fn pick(&mut self) -> Option<u32> {
        let n = self.replicas.len();
        if n == 0 {
            return None;
        }
        self.turn = (self.turn + 1) % n;
        let mut best: Option<(i64, u32)> = None;
        for i in 0..n {
            let r = &self.replicas[(self.turn + i) % n];
            if !r.healthy {
                continue;
            }
            let load = r.in_flight + r.external;
            if best.is_none_or(|(b, _)| load < b) {
                best = Some((load, r.index));
            }
        }
        best.map(|(_, index)| index)
    }

    /// The replica of a session id when it can take the call as it is: a well-formed id with a
    /// valid MAC, on a healthy replica of the same incarnation. Anything else is for Python.
    pub fn sticky(&self, key: &[u8], session_id: &[u8]) -> Option<u32> {
        let (index, instance) = parse_session(key, session_id)?;
        let r = self.replicas.iter().find(|r| r.index == index)?;
        (r.healthy && r.instance == instance).then_some(index)
    }

    pub fn record(&mut self, index: u32, seconds: f64, ok: bool) {
        if let Some(r) = self.slot(index) {
            // Never below zero: a replica re-added at a new address starts from zero while
            // calls to its old address may still finish.
            r.in_flight = (r.in_flight - 1).max(0);
        }
        let scale = &self.scale;
        self.tallies
            .entry(index)
            .or_default()
            .add(scale, seconds, ok);
    }

    pub fn take_idle(&mut self, index: u32) -> Option<Upstream> {
        self.slot(index)?.idle.pop()
    }

    pub fn put_idle(&mut self, index: u32, addr: SocketAddr, conn: Upstream) {
        if let Some(r) = self.slot(index) {
            if r.addr == addr && r.idle.len() < MAX_IDLE {
                r.idle.push(conn);
            }
        }
    }
}

/// A session id's (replica index, replica instance) when its form and MAC are valid, as
/// Python's `SessionCodec.parse` accepts it: `<index>.<instance>.<nonce>.<mac>`, index of 1-6
/// digits, instance of 1-64 `[0-9A-Za-z-]`, nonce of 12 and MAC of 16 lower-case hex digits.
pub fn parse_session<'a>(key: &[u8], session_id: &'a [u8]) -> Option<(u32, &'a str)> {
    let text = std::str::from_utf8(session_id).ok()?;
    let (body, mac) = text.rsplit_once('.')?;
    let mut parts = body.split('.');
    let (index, instance, nonce) = (parts.next()?, parts.next()?, parts.next()?);
    let is_hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let valid = parts.next().is_none()
        && (1..=6).contains(&index.len())
        && index.bytes().all(|b| b.is_ascii_digit())
        && (1..=64).contains(&instance.len())
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && is_hex(nonce, 12)
        && is_hex(mac, 16);
    if !valid {
        return None;
    }
    let expected = hex::decode(mac).ok()?;
    let mut hmac = Hmac::<Sha256>::new_from_slice(key).ok()?;
    hmac.update(body.as_bytes());
    hmac.verify_truncated_left(&expected).ok()?;
    Some((index.parse().ok()?, instance))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn scale() -> Scale {
        Scale {
            sub: 8,
            bounds: vec![0.01, 0.1],
        }
    }

    fn row(index: u32, port: u16, healthy: bool, external: i64) -> Row {
        Row {
            index,
            addr: addr(port),
            healthy,
            instance: format!("i{index}"),
            name: format!("r{index}"),
            external,
        }
    }

    fn table(rows: &[(u32, bool, i64)]) -> State {
        let mut state = State::new(Tokens::new(Vec::new(), None), scale());
        state.set_replicas(
            rows.iter()
                .map(|&(i, healthy, load)| row(i, 9000 + i as u16, healthy, load))
                .collect(),
        );
        state
    }

    #[test]
    fn pick_takes_the_least_loaded_healthy_replica() {
        let mut state = table(&[(0, true, 5), (1, false, 0), (2, true, 1)]);
        for _ in 0..4 {
            assert_eq!(state.pick(), Some(2));
        }
        assert_eq!(table(&[(0, false, 0)]).pick(), None);
        assert_eq!(
            State::new(Tokens::new(Vec::new(), None), scale()).pick(),
            None
        );
    }

    #[test]
    fn ties_take_turns() {
        let mut state = table(&[(0, true, 0), (1, true, 0), (2, true, 0)]);
        let picks: Vec<_> = (0..6).map(|_| state.pick().unwrap()).collect();
        for i in 0..3 {
            assert_eq!(picks.iter().filter(|&&p| p == i).count(), 2, "{picks:?}");
        }
    }

    #[test]
    fn own_calls_in_flight_count_as_load() {
        let mut state = table(&[(0, true, 0), (1, true, 1)]);
        state.slot(0).unwrap().in_flight = 2;
        assert_eq!(state.pick(), Some(1));
        state.record(0, 0.01, true);
        state.record(0, 0.01, true);
        state.record(0, 0.01, true); // never below zero
        assert_eq!(state.slot(0).unwrap().in_flight, 0);
        assert_eq!(state.tallies[&0].count, 3);
    }

    #[test]
    fn a_session_sticks_only_to_its_healthy_incarnation() {
        let key = b"k";
        let id = |index: u32, instance: &str| {
            let body = format!("{index}.{instance}.0123456789ab");
            let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
            mac.update(body.as_bytes());
            let tag = hex::encode(&mac.finalize().into_bytes()[..8]);
            format!("{body}.{tag}")
        };
        let state = table(&[(0, true, 0), (1, false, 0)]);
        assert_eq!(state.sticky(key, id(0, "i0").as_bytes()), Some(0));
        assert_eq!(state.sticky(key, id(0, "old").as_bytes()), None); // restarted
        assert_eq!(state.sticky(key, id(1, "i1").as_bytes()), None); // unhealthy
        assert_eq!(state.sticky(key, id(5, "i5").as_bytes()), None); // gone
        assert_eq!(state.sticky(b"other", id(0, "i0").as_bytes()), None); // forged
    }

    #[test]
    fn a_new_table_keeps_counts_of_replicas_at_the_same_address() {
        let mut state = table(&[(0, true, 0), (1, true, 0)]);
        state.slot(0).unwrap().in_flight = 3;
        state.slot(1).unwrap().in_flight = 4;
        state.set_replicas(vec![
            row(0, 9000, false, 0),
            row(1, 9999, true, 0), // moved: starts from zero
        ]);
        assert_eq!(state.slot(0).unwrap().in_flight, 3);
        assert!(!state.slot(0).unwrap().healthy);
        assert_eq!(state.slot(1).unwrap().in_flight, 0);
    }
}
