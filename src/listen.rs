//! Admission for the two listeners: how many connections may be open, how
//! many from one source address, and how long a connection may stay open
//! without sending a request; and, with TLS, the handshake, run beside the
//! accept loop so a slow client holds up no one. The rest of HTTP is axum's.
//!
//! A connection that has not sent a request yet is *quiet*. When a listener
//! is full, a new connection closes the oldest quiet one (of its own source
//! when that source is at its limit) instead of being turned away, so a
//! flood of sockets that never speak cannot lock real agents out; only when
//! nothing is quiet is the new connection closed at once. A connection closed
//! for a newcomer gives its socket back when its task next runs; while
//! [`EVICTING_AT_MOST`] of them are still open the listener accepts nothing,
//! so a flood holds no more descriptors than the limit plus that many. A quiet
//! connection is also closed when `quiet_for` passes, and a plain-HTTP
//! connection kept alive after its answers is closed when it is *idle* (no
//! request in flight, nothing sent) for `idle_for`. A WebSocket is never idle
//! here: its session pings it and closes it when it stops answering. Each
//! open connection holds its place until its socket closes.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};

use crate::telemetry::InternalEvent;
use crate::telemetry::connections::{Closed, ConnectionClosed, ConnectionMetrics};
use tokio_rustls::TlsAcceptor;

/// Connections closed for newcomers whose sockets are still open, at most:
/// past that, the listener waits for them before it accepts again.
pub const EVICTING_AT_MOST: usize = 128;

/// How long an overloaded server asks clients to wait before they try again
/// (the minimum the OpAMP specification recommends).
pub const RETRY_AFTER_SECS: u64 = 30;

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Open connections from one IP address at most (0: no limit).
    pub per_source: usize,
    /// How long a connection may stay open before its first request.
    pub quiet_for: Duration,
    /// How long a plain-HTTP connection may stay open with no request in
    /// flight once it has sent one.
    pub idle_for: Duration,
}

// A connection's first event: it sends a request, or it is evicted for a
// newcomer while still quiet. Which came first is decided atomically: a
// connection that has spoken is never evicted, and one evicted is not answered.
const QUIET: u8 = 0;
const SPOKE: u8 = 1;
const EVICTED: u8 = 2;

/// One open connection, as admission sees it.
struct Conn {
    source: IpAddr,
    /// [`QUIET`], then [`SPOKE`] or [`EVICTED`] (counted in [`Open::evicting`]).
    first: AtomicU8,
    /// Requests being answered.
    in_flight: AtomicUsize,
    /// Upgraded to a WebSocket, which its session watches.
    upgraded: AtomicBool,
    closing: AtomicBool,
    waker: AtomicWaker,
}

/// What a connection waits for, and so which deadline applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its first request (`quiet_for`).
    FirstRequest,
    /// Its answer: no deadline.
    Answer,
    /// Its next request on a kept-alive connection (`idle_for`).
    NextRequest,
    /// Nothing: a WebSocket.
    Upgraded,
}

impl Conn {
    fn new(source: IpAddr, spoke: bool) -> Conn {
        Conn {
            source,
            first: AtomicU8::new(if spoke { SPOKE } else { QUIET }),
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    /// Evicts it if it is quiet and open; true if it was.
    fn evict(&self) -> bool {
        if self.closing.load(Ordering::Acquire)
            || (self.first)
                .compare_exchange(QUIET, EVICTED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return false;
        }
        self.closing.store(true, Ordering::Release);
        self.waker.wake();
        true
    }

    fn was_evicted(&self) -> bool {
        self.first.load(Ordering::Acquire) == EVICTED
    }

    fn spoke(&self) -> bool {
        self.first.load(Ordering::Acquire) == SPOKE
    }

    /// Notes that it sent a request; false if it was evicted first.
    fn speak(&self) -> bool {
        (self.first)
            .compare_exchange(QUIET, SPOKE, Ordering::AcqRel, Ordering::Acquire)
            .map_or_else(|first| first == SPOKE, |_| true)
    }

    /// Ends once the connection is evicted.
    async fn evicted(&self) {
        std::future::poll_fn(|cx| {
            self.waker.register(cx.waker());
            match self.was_evicted() {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        })
        .await
    }

    fn is_quiet(&self) -> bool {
        self.first.load(Ordering::Acquire) == QUIET && !self.closing.load(Ordering::Acquire)
    }

    fn phase(&self) -> Phase {
        if self.upgraded.load(Ordering::Acquire) {
            Phase::Upgraded
        } else if !self.spoke() {
            Phase::FirstRequest
        } else if self.in_flight.load(Ordering::Acquire) > 0 {
            Phase::Answer
        } else {
            Phase::NextRequest
        }
    }

    /// Counts a request in flight until the guard drops; `None` if the
    /// connection was evicted before its first request.
    fn answering(self: &Arc<Conn>) -> Option<Answering> {
        if !self.speak() {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Answering(self.clone()))
    }
}

/// A request in flight on a connection.
struct Answering(Arc<Conn>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        // The reader starts the idle clock.
        self.0.waker.wake();
    }
}

#[derive(Default)]
struct Source {
    open: usize,
    quiet: VecDeque<Weak<Conn>>,
}

#[derive(Default)]
struct Open {
    total: usize,
    /// Connections evicted whose sockets are still open (counted in `total`).
    evicting: usize,
    /// Every connection in the order it was accepted, to find the oldest
    /// quiet one; entries that spoke or closed are skipped and dropped.
    quiet: VecDeque<Weak<Conn>>,
    sources: HashMap<IpAddr, Source>,
}

/// Evicts the oldest connection of `queue` that is still quiet; false if none is.
fn evict_oldest(queue: &mut VecDeque<Weak<Conn>>) -> bool {
    while let Some(weak) = queue.pop_front() {
        if weak.upgrade().is_some_and(|conn| conn.evict()) {
            return true;
        }
    }
    false
}

/// Drops entries of connections that are gone or spoke, once they outnumber
/// the live ones, so the queues stay proportional to what is open.
fn compact(queue: &mut VecDeque<Weak<Conn>>, live: usize) {
    if queue.len() > 2 * live + 16 {
        queue.retain(|w| w.upgrade().is_some_and(|c| c.is_quiet()));
    }
}

struct Admission {
    limits: Limits,
    open: Mutex<Open>,
    metrics: ConnectionMetrics,
    /// An evicted connection's socket closed.
    evicted_closed: Notify,
}

impl Admission {
    /// A place for a connection from `source`, or `None` when there is no
    /// room and nothing quiet to close.
    fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Place> {
        let mut open = self.open.lock().expect("admission lock");
        let open = &mut *open;
        let from_source = open.sources.get(&source).map_or(0, |s| s.open);
        // Where a connection must be closed to make room, if anywhere.
        let full = if self.limits.per_source > 0 && from_source >= self.limits.per_source {
            Some(&mut open.sources.get_mut(&source).expect("a source with connections").quiet)
        } else {
            (open.total >= self.limits.max_connections).then_some(&mut open.quiet)
        };
        if let Some(queue) = full {
            if !self.evict_oldest(queue, source) {
                return None;
            }
            open.evicting += 1;
        }
        let conn = Arc::new(Conn::new(source, false));
        open.total += 1;
        self.metrics.opened();
        open.quiet.push_back(Arc::downgrade(&conn));
        compact(&mut open.quiet, open.total);
        let entry = open.sources.entry(source).or_default();
        entry.open += 1;
        entry.quiet.push_back(Arc::downgrade(&conn));
        compact(&mut entry.quiet, entry.open);
        Some(Place {
            admission: self.clone(),
            conn,
        })
    }

    /// Closes the oldest quiet connection of `queue` for a new one from
    /// `source`; false (and the new one is refused) when there is none.
    fn evict_oldest(&self, queue: &mut VecDeque<Weak<Conn>>, source: IpAddr) -> bool {
        let evicted = evict_oldest(queue);
        let reason = if evicted { Closed::Evicted } else { Closed::Refused };
        ConnectionClosed { reason, source }.emit(&self.metrics);
        evicted
    }

    /// Waits while [`EVICTING_AT_MOST`] evicted connections are still open.
    async fn room_to_evict(&self) {
        loop {
            let closed = self.evicted_closed.notified();
            if self.open.lock().expect("admission lock").evicting < EVICTING_AT_MOST {
                return;
            }
            closed.await;
        }
    }

    fn release(&self, conn: &Conn) {
        self.metrics.released();
        let source = conn.source;
        let mut open = self.open.lock().expect("admission lock");
        // Its socket is closed: it can no longer be evicted, though its
        // service holds it a moment longer.
        conn.closing.store(true, Ordering::Release);
        open.total -= 1;
        if conn.was_evicted() {
            open.evicting -= 1;
            self.evicted_closed.notify_waiters();
        }
        if let Some(s) = open.sources.get_mut(&source) {
            s.open -= 1;
            if s.open == 0 {
                open.sources.remove(&source);
            }
        }
    }
}

/// A connection's place; given back when its socket closes.
struct Place {
    admission: Arc<Admission>,
    conn: Arc<Conn>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.admission.release(&self.conn);
    }
}

/// `axum::serve` over an [`AdmittingListener`].
pub type Serving = axum::serve::Serve<
    AdmittingListener,
    axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Router, Peer>,
    axum::middleware::AddExtension<Router, ConnectInfo<Peer>>,
>;

/// A TCP listener that admits connections within [`Limits`].
pub struct AdmittingListener {
    inner: TcpListener,
    admission: Arc<Admission>,
    /// With TLS, handshakes run in tasks of their own (a slow client must
    /// not hold up the accept loop) and come back here when done.
    tls: Option<TlsAcceptor>,
    handshaken: (mpsc::Sender<Connection>, mpsc::Receiver<Connection>),
}

/// An accepted connection, as axum takes it.
type Connection = (Admitted, Peer);

impl AdmittingListener {
    pub fn new(inner: TcpListener, limits: Limits, metrics: ConnectionMetrics, tls: Option<TlsAcceptor>) -> Self {
        AdmittingListener {
            inner,
            admission: Arc::new(Admission {
                limits,
                open: Mutex::new(Open::default()),
                metrics,
                evicted_closed: Notify::new(),
            }),
            tls,
            handshaken: mpsc::channel(64),
        }
    }

    /// Serves `router` on this listener: requests mark their connection as
    /// having spoken, and as busy while they are answered; a request on a
    /// connection evicted before it spoke is answered 503 ([`evicted_response`]).
    pub fn serve(self, router: Router) -> Serving {
        let router = router.layer(axum::middleware::from_fn(track_requests));
        axum::serve(self, router.into_make_service_with_connect_info::<Peer>())
    }
}

async fn track_requests(ConnectInfo(peer): ConnectInfo<Peer>, request: Request, next: Next) -> Response {
    let Some(_answering) = peer.conn.answering() else {
        return evicted_response();
    };
    let response = next.run(request).await;
    if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        peer.conn.upgraded.store(true, Ordering::Release);
    }
    response
}

/// The answer to a request on a connection evicted for a newcomer as the
/// request came: the listener is flooded, and the connection closes.
fn evicted_response() -> Response {
    (
        http::StatusCode::SERVICE_UNAVAILABLE,
        [
            (http::header::CONNECTION, "close".to_string()),
            (http::header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()),
        ],
    )
        .into_response()
}

/// The remote end of a connection, and its place in admission.
#[derive(Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The subject of the client certificate the peer presented (mTLS).
    pub certificate: Option<Arc<str>>,
    conn: Arc<Conn>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.addr.fmt(f)
    }
}

impl axum::extract::connect_info::Connected<IncomingStream<'_, AdmittingListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, AdmittingListener>) -> Self {
        stream.remote_addr().clone()
    }
}

impl axum::serve::Listener for AdmittingListener {
    type Io = Admitted;
    type Addr = Peer;

    async fn accept(&mut self) -> (Admitted, Peer) {
        loop {
            let accepted = tokio::select! {
                Some(done) = self.handshaken.1.recv() => return done,
                accepted = async {
                    self.admission.room_to_evict().await;
                    self.inner.accept().await
                } => accepted,
            };
            let (tcp, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            };
            let Some(place) = self.admission.admit(addr.ip()) else {
                continue;
            };
            // Replies are small; do not let Nagle hold them back.
            let _ = tcp.set_nodelay(true);
            let Limits {
                quiet_for, idle_for, ..
            } = self.admission.limits;
            let peer = Peer {
                addr,
                certificate: None,
                conn: place.conn.clone(),
            };
            let admitted = move |io| Admitted {
                io,
                place,
                deadline: Some(Deadline::new(Phase::FirstRequest, quiet_for)),
                idle_for,
            };
            let Some(tls) = &self.tls else {
                return (admitted(Io::Plain(tcp)), peer);
            };
            let (acceptor, done) = (tls.clone(), self.handshaken.0.clone());
            tokio::spawn(async move {
                // The handshake counts against the time to the first request,
                // and ends when the connection is evicted for a newcomer.
                let handshake = tokio::time::timeout(quiet_for, acceptor.accept(tcp));
                let stream = tokio::select! {
                    done = handshake => match done {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(peer = %addr, "TLS handshake took too long"),
                    },
                    () = peer.conn.evicted() => return,
                };
                let certificate = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(crate::tls::identity)
                    .map(Arc::from);
                let peer = Peer { certificate, ..peer };
                let _ = done.send((admitted(Io::Tls(Box::new(stream))), peer)).await;
            });
        }
    }

    fn local_addr(&self) -> io::Result<Peer> {
        let addr = self.inner.local_addr()?;
        let conn = Arc::new(Conn::new(addr.ip(), true));
        Ok(Peer {
            addr,
            certificate: None,
            conn,
        })
    }
}

/// As axum's own listener does: connection errors are the peer's business;
/// anything else (out of file descriptors) waits a moment before trying again.
async fn accept_failed(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// When a connection waiting for a request is closed.
struct Deadline {
    /// What it waits for: the first request, or the next.
    phase: Phase,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Deadline {
    fn new(phase: Phase, after: Duration) -> Deadline {
        Deadline {
            phase,
            sleep: Box::pin(tokio::time::sleep(after)),
        }
    }
}

/// An admitted connection's socket: reads end (as if the peer had closed)
/// once the connection is closed by admission, stays quiet too long, or
/// stays idle too long between requests.
pub struct Admitted {
    io: Io,
    place: Place,
    /// The deadline of the request the connection waits for; `None` while it
    /// is answered, and once it is a WebSocket.
    deadline: Option<Deadline>,
    idle_for: Duration,
}

impl AsyncRead for Admitted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let conn = &this.place.conn;
        let phase = conn.phase();
        if phase == Phase::Upgraded {
            this.deadline = None;
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        conn.waker.register(cx.waker());
        if conn.closing.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        if this.deadline.as_ref().is_some_and(|d| d.phase != phase) {
            this.deadline = None;
        }
        if phase == Phase::NextRequest && this.deadline.is_none() {
            this.deadline = Some(Deadline::new(phase, this.idle_for));
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.sleep.as_mut().poll(cx).is_ready()
        {
            conn.closing.store(true, Ordering::Release);
            let reason = match phase {
                Phase::FirstRequest => Closed::TimedOut,
                _ => Closed::Idle,
            };
            ConnectionClosed {
                reason,
                source: conn.source,
            }
            .emit(&this.place.admission.metrics);
            return Poll::Ready(Ok(()));
        }
        let filled = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if phase == Phase::NextRequest && buf.filled().len() > filled {
            // The next request is coming: its clock starts again if it stalls.
            this.deadline = None;
        }
        read
    }
}

/// The socket, plain or with TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_connections: usize, per_source: usize) -> Arc<Admission> {
        Arc::new(Admission {
            limits: Limits {
                max_connections,
                per_source,
                quiet_for: Duration::from_secs(10),
                idle_for: Duration::from_secs(300),
            },
            open: Mutex::new(Open::default()),
            metrics: ConnectionMetrics::new("test"),
            evicted_closed: Notify::new(),
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_full_listener_closes_its_oldest_quiet_connection_for_a_new_one() {
        let adm = admission(2, 0);
        let first = adm.admit(A).unwrap();
        let second = adm.admit(A).unwrap();
        let third = adm.admit(B).expect("room made");
        assert!(
            first.conn.closing.load(Ordering::Acquire),
            "the oldest quiet one closes"
        );
        assert!(!second.conn.closing.load(Ordering::Acquire));
        assert_eq!(adm.metrics.closed(Closed::Evicted), 1);
        drop(first);
        // Both open ones spoke: nothing to close, the next is turned away.
        assert!(second.conn.speak());
        assert!(third.conn.speak());
        assert!(adm.admit(B).is_none());
        assert_eq!(adm.metrics.closed(Closed::Refused), 1);
        drop(second);
        assert!(adm.admit(B).is_some(), "a closed connection gives its place back");
    }

    #[test]
    fn a_source_at_its_limit_makes_room_among_its_own_connections() {
        let adm = admission(100, 2);
        let b = adm.admit(B).unwrap();
        let a1 = adm.admit(A).unwrap();
        let a2 = adm.admit(A).unwrap();
        let _a3 = adm.admit(A).expect("room made among A's");
        assert!(a1.conn.closing.load(Ordering::Acquire));
        assert!(
            !b.conn.closing.load(Ordering::Acquire),
            "another source's connection is left alone"
        );
        assert!(a2.conn.speak());
        drop(a1);
        assert!(adm.admit(A).is_some(), "A's quiet third one is closed for it");
        assert!(adm.admit(B).is_some());
    }

    #[test]
    fn past_a_bound_of_evictions_in_flight_the_listener_waits_for_their_sockets() {
        use futures_util::FutureExt;
        let adm = admission(1, 0);
        let mut held = vec![adm.admit(A).unwrap()];
        for _ in 0..EVICTING_AT_MOST {
            assert!(adm.room_to_evict().now_or_never().is_some());
            held.push(adm.admit(A).expect("the oldest quiet one closes for it"));
        }
        assert_eq!(adm.open.lock().unwrap().evicting, EVICTING_AT_MOST);
        let mut waiting = Box::pin(adm.room_to_evict());
        assert!(
            (&mut waiting).now_or_never().is_none(),
            "every evicted socket is still open"
        );
        // The newest was not evicted: its closing leaves the count alone.
        drop(held.pop());
        assert!((&mut waiting).now_or_never().is_none());
        drop(held.remove(0));
        assert!(waiting.now_or_never().is_some(), "an evicted socket closed");
        assert_eq!(adm.open.lock().unwrap().evicting, EVICTING_AT_MOST - 1);
    }

    #[test]
    fn a_connection_either_speaks_or_is_evicted_first() {
        let adm = admission(1, 0);
        let first = adm.admit(A).unwrap();
        let second = adm.admit(A).expect("room made");
        assert!(first.conn.answering().is_none(), "evicted: its request is not answered");
        assert!(second.conn.answering().is_some());
        assert!(!second.conn.evict(), "it spoke: it is not evicted");
    }

    #[test]
    fn a_request_on_an_evicted_connection_is_told_to_come_back_later() {
        let resp = evicted_response();
        assert_eq!(resp.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[http::header::RETRY_AFTER], "30");
        assert_eq!(resp.headers()[http::header::CONNECTION], "close");
    }

    #[test]
    fn a_connection_whose_socket_closed_is_not_evicted() {
        let adm = admission(1, 0);
        let first = adm.admit(A).unwrap();
        // Its service holds the connection a moment after its socket closes.
        let held = first.conn.clone();
        drop(first);
        let second = adm.admit(A).unwrap();
        let _third = adm.admit(A).expect("room made");
        assert!(!held.was_evicted());
        assert!(second.conn.was_evicted());
        drop(second);
        assert_eq!(adm.open.lock().unwrap().evicting, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_listener_accepts_nothing_while_its_evicted_sockets_are_open() {
        use axum::serve::Listener as _;
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = AdmittingListener::new(
            tcp,
            Limits {
                max_connections: 1,
                per_source: 0,
                quiet_for: Duration::from_secs(3600),
                idle_for: Duration::from_secs(3600),
            },
            ConnectionMetrics::new("test"),
            None,
        );
        // Each accepted after the first evicts the one before, whose socket
        // stays open while nothing reads it.
        let (mut clients, mut held) = (Vec::new(), Vec::new());
        for _ in 0..=EVICTING_AT_MOST {
            clients.push(TcpStream::connect(addr).await.unwrap());
            held.push(listener.accept().await.0);
        }
        clients.push(TcpStream::connect(addr).await.unwrap());
        let mut next = Box::pin(listener.accept());
        // The clock is paused: it moves on only when nothing else can.
        let waited = tokio::time::timeout(Duration::from_secs(60), &mut next).await;
        assert!(waited.is_err(), "accepted with {EVICTING_AT_MOST} evicted sockets open");
        drop(held.remove(0));
        let (admitted, _) = next.await;
        assert!(admitted.place.conn.is_quiet());
        assert_eq!(listener.admission.open.lock().unwrap().evicting, EVICTING_AT_MOST);
    }

    #[test]
    fn a_connection_waits_for_its_first_request_then_its_answers_then_the_next() {
        let adm = admission(10, 0);
        let place = adm.admit(A).unwrap();
        let conn = &place.conn;
        assert_eq!(conn.phase(), Phase::FirstRequest);
        let first = conn.answering();
        let second = conn.answering();
        assert_eq!(conn.phase(), Phase::Answer);
        drop(first);
        assert_eq!(conn.phase(), Phase::Answer, "one request is still in flight");
        drop(second);
        assert_eq!(conn.phase(), Phase::NextRequest);
        assert!(!conn.is_quiet(), "it spoke: no longer evicted for a newcomer");
        conn.upgraded.store(true, Ordering::Release);
        assert_eq!(conn.phase(), Phase::Upgraded);
    }

    #[test]
    fn places_are_counted_back_and_queues_stay_small() {
        let adm = admission(10, 0);
        for _ in 0..10_000 {
            let p = adm.admit(A).unwrap();
            assert!(p.conn.speak());
        }
        let open = adm.open.lock().unwrap();
        assert_eq!(open.total, 0);
        assert!(open.sources.is_empty());
        assert!(open.quiet.len() <= 16 + 2, "{}", open.quiet.len());
    }
}
