//! `kubeforge._relay`: the router's call path in Rust (DESIGN §3, "a lean data path").
//!
//! The relay owns the router's public port. It relays `POST /v1/call/...` to a replica itself
//! when Python's routing table (pushed here with `set_replicas`) says where the call goes
//! without a decision: a call without a session to the least-loaded healthy replica, a call in
//! a session to its own healthy replica. Every other request, and every relayed call that
//! failed, goes to the router's Python server on a loopback port, marked with a per-process
//! secret; Python then answers exactly as it would without the relay. Per-replica tallies of
//! relayed calls (counted on Python's scale, see tally.rs) and in-flight counts come back
//! through `drain`, so Python keeps the one metrics implementation.
//! A connection the relay does not serve itself (a large body that streams, a request it does
//! not parse) is handed over whole: its socket goes to the Python server with the bytes read so
//! far, so no byte crosses an extra hop.
//!
//! One thread runs a single-threaded tokio runtime: on a two-core pod a second thread would
//! only compete with the replicas' own work.

mod broadcast;
mod conn;
mod http;
mod state;
mod tally;
mod upstream;
#[cfg(test)]
mod vectors;
mod wire;

/// Header names and paths from kubeforge/contract.toml (see build.rs).
#[allow(dead_code)] // the whole contract, of which the relay reads a part
mod names {
    include!(concat!(env!("OUT_DIR"), "/names.rs"));
}

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use tokio::net::TcpListener;
use tokio::sync::watch;

use state::{Settings, State, Tokens};
use tally::{Scale, Tally};

pub struct Shared {
    pub settings: Settings,
    pub state: Mutex<State>,
    pub busy: AtomicUsize, // requests being answered now
    /// Longest a relayed call may take, in microseconds; the Service's settings may change it.
    request_timeout_us: AtomicU64,
    /// Connections handed over and not yet taken by Python: socket, bytes read from it so far.
    handed: Mutex<Vec<(OwnedFd, Vec<u8>)>>,
    /// Written to when `handed` grows; Python's event loop watches the other end.
    wake: UnixStream,
    /// Broadcasts the relay sent and Python answers: each replica's outcome, by id.
    parked: Mutex<HashMap<u64, Vec<broadcast::Outcome>>>,
    next_parked: AtomicU64,
}

impl Shared {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_micros(self.request_timeout_us.load(Ordering::Relaxed))
    }

    /// Give a connection, and what was read from it, to the Python server.
    pub fn hand_over(&self, socket: OwnedFd, read: Vec<u8>) {
        self.handed.lock().unwrap().push((socket, read));
        // Full means Python has wake-ups pending already: it takes every connection on each.
        let _ = (&self.wake).write(&[1]);
    }

    /// Keep a broadcast's outcomes for Python to take; the id to take them by.
    pub fn park(&self, outcomes: Vec<broadcast::Outcome>) -> u64 {
        let id = self.next_parked.fetch_add(1, Ordering::Relaxed);
        self.parked.lock().unwrap().insert(id, outcomes);
        id
    }

    /// Drop what Python did not take (it answered without them, or never answered).
    pub fn unpark(&self, id: u64) {
        self.parked.lock().unwrap().remove(&id);
    }
}

/// A replica's outcome as Python takes it: (index, name, status, content type, body) for an
/// answer, (index, name, None, None, report) for none. Its time is in the relay's tally already.
type Taken<'py> = (
    u32,
    String,
    Option<u16>,
    Option<Bound<'py, PyBytes>>,
    Bound<'py, PyAny>,
);

/// A replica's tally as Python receives it (`Relay.drain`).
type Drained = (u32, u64, u64, f64, Vec<(i64, u64)>, Vec<u64>);

fn drained(tallies: BTreeMap<u32, Tally>) -> Vec<Drained> {
    tallies
        .into_iter()
        .map(|(index, t)| {
            let hist = t.hist.into_iter().collect();
            (index, t.count, t.errors, t.latency_sum, hist, t.durations)
        })
        .collect()
}

/// Samples (index, seconds, ok) tallied as the relay tallies its calls, drained: for the test
/// that folding a tally gives Python's windows what folding its samples one by one would.
#[pyfunction]
fn tally_samples(samples: Vec<(u32, f64, bool)>, scale: (u32, Vec<f64>)) -> Vec<Drained> {
    let scale = Scale::from(scale);
    let mut tallies: BTreeMap<u32, Tally> = BTreeMap::new();
    for (index, seconds, ok) in samples {
        tallies.entry(index).or_default().add(&scale, seconds, ok);
    }
    drained(tallies)
}

/// The relay's answer to a broadcast whose replies were `responses` (whole HTTP responses),
/// or None when it would hand them to Python: for the test that it writes what Python writes.
#[pyfunction]
fn broadcast_envelope<'py>(
    py: Python<'py>,
    content_type: &[u8],
    names: Vec<String>,
    responses: Vec<Vec<u8>>,
) -> Option<Bound<'py, PyBytes>> {
    broadcast::splice(content_type, &names, responses).map(|out| PyBytes::new(py, &out))
}

fn micros(value: Duration) -> u64 {
    u64::try_from(value.as_micros()).unwrap_or(u64::MAX)
}

#[pyclass(module = "kubeforge._relay")]
struct Relay {
    shared: Arc<Shared>,
    port: u16,
    stop: watch::Sender<bool>,
    grace: Arc<Mutex<Duration>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    woken: UnixStream, // readable when connections wait in `handed`
}

fn seconds(value: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a finite number of seconds >= 0, not {value}"
        ))
    })
}

fn ip(host: &str) -> PyResult<IpAddr> {
    host.parse()
        .map_err(|_| PyValueError::new_err(format!("not an IP address: {host:?}")))
}

#[pymethods]
impl Relay {
    /// Bind `host:port` now (so a busy port fails here) and start relaying in a thread.
    #[new]
    #[pyo3(signature = (host, port, backend_port, accept, send, secret, session_key, request_timeout, connect_timeout, max_body, scale, tls=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: &str,
        port: u16,
        backend_port: u16,
        accept: Vec<String>,
        send: Option<String>,
        secret: String,
        session_key: String,
        request_timeout: f64,
        connect_timeout: f64,
        max_body: usize,
        scale: (u32, Vec<f64>),
        tls: Option<(Vec<u8>, String)>,
    ) -> PyResult<Self> {
        let tls = match tls {
            Some((ca, name)) => {
                Some(upstream::Tls::new(&ca, &name).map_err(PyValueError::new_err)?)
            }
            None => None,
        };
        let request_timeout = seconds(request_timeout, "request_timeout")?;
        let connect_timeout = seconds(connect_timeout, "connect_timeout")?;
        let listener = StdListener::bind((ip(host)?, port))
            .map_err(|e| PyOSError::new_err(format!("cannot bind {host}:{port}: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        let port = listener
            .local_addr()
            .map_err(|e| PyOSError::new_err(e.to_string()))?
            .port();
        let backend = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), backend_port);
        let os_error = |e: std::io::Error| PyOSError::new_err(e.to_string());
        let (wake, woken) = UnixStream::pair().map_err(os_error)?;
        wake.set_nonblocking(true).map_err(os_error)?;
        woken.set_nonblocking(true).map_err(os_error)?;
        let shared = Arc::new(Shared {
            settings: Settings::new(
                backend,
                &secret,
                session_key,
                tls,
                max_body,
                connect_timeout,
            ),
            state: Mutex::new(State::new(Tokens::new(accept, send), Scale::from(scale))),
            busy: AtomicUsize::new(0),
            request_timeout_us: AtomicU64::new(micros(request_timeout)),
            handed: Mutex::new(Vec::new()),
            wake,
            parked: Mutex::new(HashMap::new()),
            next_parked: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(false);
        let grace = Arc::new(Mutex::new(Duration::ZERO));
        let thread = {
            let (shared, grace) = (shared.clone(), grace.clone());
            std::thread::Builder::new()
                .name("kubeforge-relay".into())
                .spawn(move || run(shared, listener, stopped, grace))
                .map_err(|e| PyOSError::new_err(e.to_string()))?
        };
        Ok(Relay {
            shared,
            port,
            stop,
            grace,
            thread: Mutex::new(Some(thread)),
            woken,
        })
    }

    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// A descriptor that turns readable when handed-over connections wait (`take_handed`).
    #[getter]
    fn wake_fd(&self) -> RawFd {
        self.woken.as_raw_fd()
    }

    /// The connections handed over since the last call: (socket descriptor, now the caller's
    /// to close; the bytes the relay read from it, which come first).
    fn take_handed<'py>(&self, py: Python<'py>) -> Vec<(RawFd, Bound<'py, PyBytes>)> {
        let mut drained = [0u8; 256];
        while matches!((&self.woken).read(&mut drained), Ok(n) if n > 0) {}
        let handed = std::mem::take(&mut *self.shared.handed.lock().unwrap());
        handed
            .into_iter()
            .map(|(fd, read)| (fd.into_raw_fd(), PyBytes::new(py, &read)))
            .collect()
    }

    /// The outcomes of a broadcast the relay passed on (`x-kubeforge-relay-broadcast: <id>`),
    /// in the order it sent to the replicas; None once taken, or when it gave up waiting.
    fn take_broadcast<'py>(&self, py: Python<'py>, id: u64) -> Option<Vec<Taken<'py>>> {
        let outcomes = self.shared.parked.lock().unwrap().remove(&id)?;
        let taken = outcomes.into_iter().map(|o| {
            let (status, content_type, body) = match &o.reply {
                Ok(reply) => (
                    Some(reply.head.status),
                    reply.content_type().map(|ct| PyBytes::new(py, ct)),
                    PyBytes::new(py, reply.body()).into_any(),
                ),
                Err(failure) => (None, None, PyString::new(py, failure.as_str()).into_any()),
            };
            (o.index, o.name.to_string(), status, content_type, body)
        });
        Some(taken.collect())
    }

    /// Take the tokens a rotation brought: the ones accepted from callers, the one sent on.
    #[pyo3(signature = (accept, send))]
    fn set_tokens(&self, accept: Vec<String>, send: Option<String>) {
        self.shared.state.lock().unwrap().tokens = Tokens::new(accept, send);
    }

    /// Follow a changed request timeout (the Service resource's `requestTimeout`).
    fn set_request_timeout(&self, request_timeout: f64) -> PyResult<()> {
        let value = seconds(request_timeout, "request_timeout")?;
        self.shared
            .request_timeout_us
            .store(micros(value), Ordering::Relaxed);
        Ok(())
    }

    /// The replicas: (index, ip, port, healthy, instance, name, load others put on it).
    #[allow(clippy::type_complexity)]
    fn set_replicas(
        &self,
        replicas: Vec<(u32, String, u16, bool, String, String, i64)>,
    ) -> PyResult<()> {
        let mut update = Vec::with_capacity(replicas.len());
        for (index, host, port, healthy, instance, name, external) in replicas {
            update.push(state::Row {
                index,
                addr: SocketAddr::new(ip(&host)?, port),
                healthy,
                instance,
                name,
                external,
            });
        }
        self.shared.state.lock().unwrap().set_replicas(update);
        Ok(())
    }

    /// Each replica's tally of relayed calls since the last drain, (index, calls, errors,
    /// latency sum, [(log bucket, calls)], [calls per duration bucket]), and the calls in
    /// flight per index.
    fn drain(&self) -> (Vec<Drained>, Vec<(u32, i64)>) {
        let mut state = self.shared.state.lock().unwrap();
        let tallies = drained(std::mem::take(&mut state.tallies));
        let in_flight = state
            .replicas
            .iter()
            .map(|r| (r.index, r.in_flight))
            .collect();
        (tallies, in_flight)
    }

    /// Calls and broadcasts since the start: answered through the relay, handed over to the
    /// Python server.
    fn counts(&self) -> (u64, u64) {
        let state = self.shared.state.lock().unwrap();
        (state.calls_relayed, state.calls_handed_over)
    }

    /// Stop accepting, let calls being answered finish within `grace` seconds, then close.
    fn close(&self, py: Python<'_>, grace: f64) {
        *self.grace.lock().unwrap() = seconds(grace.max(0.0), "grace").unwrap_or(Duration::ZERO);
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.lock().unwrap().take() {
            py.allow_threads(|| {
                let _ = thread.join();
            });
        }
    }
}

fn run(
    shared: Arc<Shared>,
    listener: StdListener,
    mut stopped: watch::Receiver<bool>,
    grace: Arc<Mutex<Duration>>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let listener = TcpListener::from_std(listener).expect("a listener");
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    match accepted {
                        Ok((stream, _)) => {
                            tokio::spawn(conn::serve(shared.clone(), stream, stopped.clone()));
                        }
                        // Out of file descriptors, say: pause rather than spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                _ = stopped.changed() => break,
            }
        }
        drop(listener);
        let deadline = Instant::now() + *grace.lock().unwrap();
        while shared.busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // Dropping the runtime drops every connection task, closing their sockets.
}

#[pymodule]
fn _relay(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Relay>()?;
    m.add_function(wrap_pyfunction!(tally_samples, m)?)?;
    m.add_function(wrap_pyfunction!(broadcast_envelope, m)?)?;
    Ok(())
}
