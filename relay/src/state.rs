//! What the relay knows about replicas, pushed from Python, and what it measured, pulled back.
//!
//! Python's routing table stays the authority (health, sessions, placement); this is its
//! read-mostly copy for the hot path, plus the relay's own in-flight counts and latency samples.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::net::TcpStream;

/// Samples kept when Python does not drain them (it does, every health poll).
const MAX_SAMPLES: usize = 1 << 20;
/// Idle keep-alive connections kept per upstream.
const MAX_IDLE: usize = 256;

pub struct Replica {
    pub index: u32,
    pub addr: SocketAddr,
    pub host_header: String,
    pub healthy: bool,
    pub instance: String,
    /// Load others put on it, as Python last computed it (its own calls + other routers').
    pub external: i64,
    /// Calls this relay has open to it now.
    pub in_flight: i64,
    pub idle: Vec<TcpStream>,
}

/// One relayed call: replica index, seconds from send to answer, and whether it succeeded.
pub type Sample = (u32, f64, bool);

/// What never changes while the relay runs.
pub struct Settings {
    pub backend: SocketAddr,
    pub auth: Option<Vec<u8>>, // the exact `Authorization` value a caller must send
    pub upstream_auth: Vec<u8>, // the header line the relay adds towards replicas
    pub secret_line: Vec<u8>,  // the header line that tells Python a request came from here
    pub session_key: Vec<u8>,
    pub max_body: usize,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Settings {
    pub fn new(
        backend: SocketAddr,
        token: Option<String>,
        secret: &str,
        session_key: String,
        max_body: usize,
        request_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        Settings {
            backend,
            auth: token.as_ref().map(|t| format!("Bearer {t}").into_bytes()),
            upstream_auth: match &token {
                Some(t) => format!("authorization: Bearer {t}\r\n").into_bytes(),
                None => Vec::new(),
            },
            secret_line: format!("x-kubeforge-relay-secret: {secret}\r\n").into_bytes(),
            session_key: session_key.into_bytes(),
            max_body,
            request_timeout,
            connect_timeout,
        }
    }
}

pub struct State {
    pub replicas: Vec<Replica>, // in index order
    pub samples: Vec<Sample>,
    pub backend_idle: Vec<TcpStream>,
    pub calls_relayed: u64, // calls answered by a replica through the relay
    pub calls_handed_over: u64, // calls passed to the Python server (decisions, failures)
    turn: usize,
}

impl State {
    pub fn new() -> Self {
        State {
            replicas: Vec::new(),
            samples: Vec::new(),
            backend_idle: Vec::new(),
            calls_relayed: 0,
            calls_handed_over: 0,
            turn: 0,
        }
    }

    /// Replace the replica list, keeping pooled connections and in-flight counts of replicas
    /// that stay at the same address.
    pub fn set_replicas(&mut self, update: Vec<(u32, SocketAddr, bool, String, i64)>) {
        let mut old: HashMap<u32, Replica> =
            self.replicas.drain(..).map(|r| (r.index, r)).collect();
        for (index, addr, healthy, instance, external) in update {
            let (in_flight, idle) = match old.remove(&index) {
                Some(r) if r.addr == addr => (r.in_flight, r.idle),
                _ => (0, Vec::new()),
            };
            self.replicas.push(Replica {
                index,
                addr,
                host_header: addr.to_string(),
                healthy,
                instance,
                external,
                in_flight,
                idle,
            });
        }
        self.replicas.sort_by_key(|r| r.index);
    }

    pub fn slot(&mut self, index: u32) -> Option<&mut Replica> {
        self.replicas.iter_mut().find(|r| r.index == index)
    }

    pub fn healthy_count(&self) -> usize {
        self.replicas.iter().filter(|r| r.healthy).count()
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
        let text = std::str::from_utf8(session_id).ok()?;
        let (body, mac) = text.rsplit_once('.')?;
        let mut parts = body.splitn(3, '.');
        let index: u32 = parts.next()?.parse().ok()?;
        let instance = parts.next()?;
        let _nonce = parts.next()?;
        // Lower-case hex only, as Python's codec writes and accepts it.
        if mac.len() != 16 || !mac.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let expected = hex::decode(mac).ok()?;
        let mut hmac = Hmac::<Sha256>::new_from_slice(key).ok()?;
        hmac.update(body.as_bytes());
        hmac.verify_truncated_left(&expected).ok()?;
        let r = self.replicas.iter().find(|r| r.index == index)?;
        (r.healthy && r.instance == instance).then_some(index)
    }

    pub fn record(&mut self, index: u32, seconds: f64, ok: bool) {
        if let Some(r) = self.slot(index) {
            // Never below zero: a replica re-added at a new address starts from zero while
            // calls to its old address may still finish.
            r.in_flight = (r.in_flight - 1).max(0);
        }
        if self.samples.len() < MAX_SAMPLES {
            self.samples.push((index, seconds, ok));
        }
    }

    pub fn take_idle(&mut self, index: u32) -> Option<TcpStream> {
        self.slot(index)?.idle.pop()
    }

    pub fn put_idle(&mut self, index: u32, addr: SocketAddr, conn: TcpStream) {
        if let Some(r) = self.slot(index) {
            if r.addr == addr && r.idle.len() < MAX_IDLE {
                r.idle.push(conn);
            }
        }
    }
}
