//! One OpAMP exchange at a time: a WebSocket connection's life, or one plain
//! HTTP request. Decodes, asks the fleet task what to answer, encodes.

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use tokio::time::{Instant, MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::codec::{self, DecodeError};
use super::context::OpampContext;
use crate::desired::ConfigBundle;
use crate::fleet::record::{self, Liveness};
use crate::fleet::{Capabilities, ConnId, PushSlot, Reply, ReportError, Transport, Via, WsLink};
use crate::listen::RETRY_AFTER_SECS;
use crate::model::{Identity, InstanceUid};
use crate::proto::{
    AgentConfigFile, AgentConfigMap, AgentIdentification, AgentRemoteConfig, AgentToServer, ConnectionSettingsOffers,
    OpAmpConnectionSettings, RetryInfo, ServerErrorResponse, ServerErrorResponseType, ServerToAgent,
    server_error_response,
};
use crate::telemetry::InternalEvent;
use crate::telemetry::opamp::{
    AgentRefused, HttpBodyUnreadable, HttpMessageMalformed, HttpMessageTooBig, HttpOverloaded, MessageReceived,
    Refusal, WebSocketClosed, WebSocketMessageMalformed, WebSocketMessageTooBig, WebSocketOpened,
};
use prost::Message as _;
use sha2::Digest;

/// AcceptsStatus | OffersRemoteConfig | AcceptsEffectiveConfig, plus
/// OffersConnectionSettings when a heartbeat interval is offered (see
/// [`heartbeat_offer`]).
pub const SERVER_CAPABILITIES: u64 = 0x1 | 0x2 | 0x4;
const OFFERS_CONNECTION_SETTINGS: u64 = 0x20;
const REPORTS_HEARTBEAT: u64 = 0x2000;
const ACCEPTS_OPAMP_CONNECTION_SETTINGS: u64 = 0x100;
const FLAG_REPORT_FULL_STATE: u64 = 0x1;
/// How long a closing WebSocket waits for the peer's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How much of an oversized HTTP body is read and dropped so that the client
/// sees the 413 instead of a reset connection.
const OVERSIZE_DRAIN: usize = 4 * 1024 * 1024;
/// The most buffer reserved for an HTTP body before its bytes arrive: the
/// declared length is the client's word, not memory it has paid for.
const BODY_RESERVE: usize = 64 * 1024;
/// How long a client may take to send an HTTP body; a slower one gets 408.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

/// The `AgentRemoteConfig` for a pushed bundle. Bodies are shared, not copied.
pub fn remote_config(bundle: &ConfigBundle) -> AgentRemoteConfig {
    AgentRemoteConfig {
        config: Some(AgentConfigMap {
            config_map: bundle
                .files()
                .iter()
                .map(|(name, f)| {
                    (
                        name.clone(),
                        AgentConfigFile {
                            body: f.body.clone(),
                            content_type: f.content_type.clone(),
                        },
                    )
                })
                .collect(),
        }),
        config_hash: Bytes::copy_from_slice(bundle.hash().as_bytes()),
    }
}

/// The server's capabilities as this server is configured.
fn capabilities(ctx: &OpampContext) -> u64 {
    match ctx.offer_heartbeat {
        Some(_) => SERVER_CAPABILITIES | OFFERS_CONNECTION_SETTINGS,
        None => SERVER_CAPABILITIES,
    }
}

/// The heartbeat interval to offer an agent with these capabilities, if any:
/// only to agents that report heartbeats and do not accept OpAMP connection
/// settings (a supervisor that does rebuilds its whole server connection from
/// an offer, dropping the headers and TLS settings it was configured with).
/// The offer's hash is fixed by the interval, so a client that has applied
/// it treats a repeat as nothing new.
fn heartbeat_offer(ctx: &OpampContext, agent_capabilities: u64) -> Option<ConnectionSettingsOffers> {
    let interval = ctx.offer_heartbeat?;
    if agent_capabilities & REPORTS_HEARTBEAT == 0 || agent_capabilities & ACCEPTS_OPAMP_CONNECTION_SETTINGS != 0 {
        return None;
    }
    let seconds = interval.as_secs().max(1);
    Some(ConnectionSettingsOffers {
        hash: Bytes::copy_from_slice(&sha2::Sha256::digest(seconds.to_be_bytes())),
        opamp: Some(OpAmpConnectionSettings {
            heartbeat_interval_seconds: seconds,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The reply to a report, echoing the agent's uid bytes unchanged.
/// `capabilities` is 0 where the reply need not carry them.
fn reply_message(uid: Bytes, r: &Reply, capabilities: u64, offer: Option<ConnectionSettingsOffers>) -> ServerToAgent {
    ServerToAgent {
        instance_uid: uid,
        flags: if r.report_full_state { FLAG_REPORT_FULL_STATE } else { 0 },
        capabilities,
        connection_settings: offer,
        agent_identification: r.new_instance_uid.as_ref().map(|u| AgentIdentification {
            new_instance_uid: Bytes::copy_from_slice(u.as_bytes()),
        }),
        remote_config: r.remote_config.as_deref().map(remote_config),
        ..Default::default()
    }
}

/// An error reply: the spec wants every field after `error_response` unset.
fn error_reply(uid: Bytes, kind: ServerErrorResponseType, message: String) -> ServerToAgent {
    ServerToAgent {
        instance_uid: uid,
        error_response: Some(ServerErrorResponse {
            r#type: kind as i32,
            error_message: message,
            details: None,
        }),
        ..Default::default()
    }
}

/// What a decoded message turned into.
enum Outcome {
    Reply {
        uid: InstanceUid,
        msg: ServerToAgent,
        liveness: Option<Arc<Liveness>>,
    },
    /// A second agent under a uid in use: offered the uid in the reply.
    Clash {
        uid: InstanceUid,
        offered: InstanceUid,
        msg: ServerToAgent,
    },
    /// A protocol error answered with `error_response`.
    Refused(ServerToAgent),
    /// This WebSocket was replaced; close it.
    Replaced,
    /// The fleet is overloaded: come back later.
    Busy,
    /// The uid belongs to another identity.
    Forbidden,
    Stopping,
}

async fn exchange(
    ctx: &OpampContext,
    msg: AgentToServer,
    via: Via,
    previous: Option<&InstanceUid>,
    identity: Option<&Identity>,
    with_capabilities: bool,
) -> Outcome {
    let wire = msg.instance_uid.clone();
    let uid = match InstanceUid::from_wire(&wire) {
        Ok(uid) => uid,
        Err(e) => {
            tracing::warn!(error = %e, "refused a message with a bad instance_uid");
            return Outcome::Refused(error_reply(wire, ServerErrorResponseType::BadRequest, e.to_string()));
        }
    };
    let previous = previous.filter(|p| **p != uid).cloned();
    // Capabilities and the heartbeat offer go in every HTTP reply and in the
    // first reply on a WebSocket.
    let (caps, offer) = if with_capabilities {
        (capabilities(ctx), heartbeat_offer(ctx, msg.capabilities))
    } else {
        (0, None)
    };
    match ctx
        .fleet
        .report_as(uid.clone(), msg, via, previous, identity.cloned())
        .await
    {
        Ok(r) if r.replaced => Outcome::Replaced,
        Ok(r) if r.clash => Outcome::Clash {
            msg: reply_message(wire, &r, caps, offer),
            offered: r.new_instance_uid.clone().expect("a clash always offers a uid"),
            uid,
        },
        Ok(r) => {
            if r.report_full_state {
                tracing::debug!(agent = %uid, "asking for full state");
            }
            Outcome::Reply {
                msg: reply_message(wire, &r, caps, offer),
                uid,
                liveness: r.liveness,
            }
        }
        Err(ReportError::Busy) => Outcome::Busy,
        Err(ReportError::Stopped) => Outcome::Stopping,
        Err(ReportError::Impersonation) => {
            AgentRefused {
                reason: Refusal::Impersonation,
                source: None,
            }
            .emit(&ctx.metrics);
            Outcome::Forbidden
        }
    }
}

/// A WebSocket report the fleet took.
struct Accepted {
    uid: InstanceUid,
    /// The uid as the agent sent it.
    wire: Bytes,
    /// Where the agent's next heartbeats are recorded, while it is connected.
    liveness: Option<Arc<Liveness>>,
}

/// What a WebSocket does after a report.
enum Next {
    /// Send this frame; with the agent once the report was accepted.
    Send(Message, Option<Accepted>),
    /// Hold this reply to the agent's first report for the config that may
    /// follow it (see [`OpampContext::first_reply_wait`]).
    Owe(Box<ServerToAgent>, Accepted),
    /// Send this frame, which offers the agent a uid of its own (`.2`)
    /// instead of the one in use (`.1`).
    Clash(Message, InstanceUid, InstanceUid),
    Close(u16, &'static str),
}

/// The exchange for one WebSocket report, down to the frame to send. A
/// first report (`first`) whose reply says nothing but that it was taken, from
/// an agent whose config the controller can manage, is answered by
/// [`Next::Owe`] when the context allows a wait.
async fn answer(
    ctx: &OpampContext,
    msg: AgentToServer,
    via: Via,
    previous: Option<&InstanceUid>,
    identity: Option<&Identity>,
    first: bool,
) -> Next {
    let manageable = Capabilities(msg.capabilities).unsupported_reason().is_none();
    match exchange(ctx, msg, via, previous, identity, first).await {
        Outcome::Reply { uid, msg, liveness } => {
            let accepted = Accepted {
                uid,
                wire: msg.instance_uid.clone(),
                liveness,
            };
            let plain = msg.remote_config.is_none() && msg.flags == 0 && msg.agent_identification.is_none();
            if first && manageable && plain && !ctx.first_reply_wait.borrow().is_zero() {
                Next::Owe(Box::new(msg), accepted)
            } else {
                Next::Send(binary(&msg), Some(accepted))
            }
        }
        Outcome::Clash { uid, offered, msg } => Next::Clash(binary(&msg), uid, offered),
        Outcome::Refused(msg) => Next::Send(binary(&msg), None),
        Outcome::Replaced => Next::Close(close::NORMAL, "replaced by a newer connection"),
        Outcome::Busy => Next::Close(close::TRY_AGAIN_LATER, "server overloaded"),
        Outcome::Forbidden => Next::Close(close::POLICY_VIOLATION, "instance uid belongs to another identity"),
        Outcome::Stopping => Next::Close(close::GOING_AWAY, "server shutting down"),
    }
}

/// The WebSocket close codes we use.
mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Runs one WebSocket connection until either side closes it, it is
/// replaced by a newer connection of the same agent, or the server stops.
///
/// An idle connection is this future and little else, so it is kept small:
/// it only waits for the next event, and each event is handled by a boxed
/// future of its own that lives while the event is handled. The socket and
/// the session are used where the future holds them: an `async fn` would
/// keep its arguments beside the locals it moves them into.
pub fn run_websocket(
    socket: WebSocket,
    ctx: Arc<OpampContext>,
    identity: Option<Identity>,
    tracked: TaskTrackerToken,
) -> impl Future<Output = ()> + Send + 'static {
    let mut s = Session::open(ctx, identity, tracked);
    let mut socket = socket;
    async move {
        let end = s.serve(&mut socket).await;
        Box::pin(s.end(socket, end)).await;
    }
}

/// What a session does after an event: go on, or end (with the close frame
/// to send, if any).
type Step = Result<(), Option<(u16, &'static str)>>;

/// What a frame read from the WebSocket asks for.
enum Read {
    Done(Step),
    /// Send this frame.
    Answer(Message),
    /// The fleet answers this report (boxed: the message is large, and the
    /// connection's future holds this while the report is handled).
    Report(Box<AgentToServer>),
}

/// One WebSocket connection's state between events.
struct Session {
    ctx: Arc<OpampContext>,
    identity: Option<Identity>,
    conn: ConnId,
    pushes: Arc<PushSlot>,
    close: CancellationToken,
    /// The uid this connection reports as, and its bytes as the agent sent them.
    agent: Option<(InstanceUid, Bytes)>,
    /// Once the fleet knows the agent on this connection: where its
    /// heartbeats go, and the capabilities its last message had. A heartbeat
    /// is recorded and answered here, without a trip to the fleet task.
    heartbeats: Option<(Arc<Liveness>, u64)>,
    /// A uid in use by another agent that this one also reported under, and
    /// the uid it was offered instead: asked again until it adopts it.
    clash: Option<(InstanceUid, InstanceUid)>,
    capabilities_sent: bool,
    /// The reply to the agent's first report, held for the config the
    /// reconciler is about to push: sent with it, before the answer to any
    /// later frame, or when the wait is over.
    owed: Option<Box<ServerToAgent>>,
    last_frame: Instant,
    /// Shutdown waits for the session until this goes.
    _tracked: TaskTrackerToken,
}

impl Session {
    fn open(ctx: Arc<OpampContext>, identity: Option<Identity>, tracked: TaskTrackerToken) -> Self {
        WebSocketOpened.emit(&ctx.metrics);
        Session {
            conn: ctx.next_conn_id(),
            pushes: Arc::new(PushSlot::default()),
            close: ctx.shutdown.child_token(),
            ctx,
            identity,
            agent: None,
            heartbeats: None,
            clash: None,
            capabilities_sent: false,
            owed: None,
            last_frame: Instant::now(),
            _tracked: tracked,
        }
    }

    /// Handles the connection's events until it ends; the close frame to
    /// send, if any.
    async fn serve(&mut self, socket: &mut WebSocket) -> Option<(u16, &'static str)> {
        // A half-open connection never closes by itself: ping, and give up on a
        // peer that has sent nothing (pongs included) for three intervals.
        let interval = self.ctx.heartbeat_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Waited on from one event to the next: each joins its waiters once,
        // not again with every message.
        let (close, pushes) = (self.close.clone(), self.pushes.clone());
        let mut closed = pin!(close.cancelled());
        let mut pushed = pin!(pushes.ready());
        // While a reply is owed: when it goes without a config (boxed: a
        // connection owes one only right after its first report).
        let mut owed_until: Option<Pin<Box<Sleep>>> = None;
        loop {
            let step = tokio::select! {
                _ = ping.tick() => Box::pin(self.ping(socket)).await,
                () = &mut closed => Err(Some(if self.ctx.shutdown.is_cancelled() {
                    (close::GOING_AWAY, "server shutting down")
                } else {
                    (close::NORMAL, "replaced by a newer connection")
                })),
                () = &mut pushed => {
                    pushed.set(pushes.ready());
                    Box::pin(self.push(socket)).await
                }
                () = expiry(&mut owed_until) => Box::pin(self.pay(socket)).await,
                // A heartbeat is answered without the future of a report,
                // which is large and would be moved into its box each time.
                frame = socket.recv() => 'frame: {
                    if self.owed.is_some()
                        && let Err(end) = Box::pin(self.pay(socket)).await
                    {
                        break 'frame Err(end);
                    }
                    match self.read(frame) {
                        Read::Done(step) => step,
                        Read::Answer(reply) => Box::pin(self.send(socket, reply)).await,
                        Read::Report(msg) => Box::pin(self.report(socket, msg)).await,
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
            match (&self.owed, &owed_until) {
                (Some(_), None) => {
                    let wait = *self.ctx.first_reply_wait.borrow();
                    owed_until = Some(Box::pin(tokio::time::sleep(wait)));
                }
                (None, Some(_)) => owed_until = None,
                _ => {}
            }
        }
    }

    /// A peer that stops reading would hold a write (and its buffered frame)
    /// forever: a frame not written within three intervals ends the connection.
    fn stuck_after(&self) -> Duration {
        self.ctx.heartbeat_interval.saturating_mul(3)
    }

    async fn send(&self, socket: &mut WebSocket, frame: Message) -> Step {
        if send(socket, frame, self.stuck_after()).await {
            Ok(())
        } else {
            Err(None)
        }
    }

    async fn ping(&mut self, socket: &mut WebSocket) -> Step {
        let interval = self.ctx.heartbeat_interval;
        if self.last_frame.elapsed() > interval.saturating_mul(3) {
            tracing::info!(
                conn = self.conn,
                "WebSocket silent for three heartbeat intervals; closing it"
            );
            return Err(None);
        }
        // A peer heard from within the interval is there: no ping needed.
        if self.last_frame.elapsed() < interval {
            return Ok(());
        }
        self.send(socket, Message::Ping(Bytes::new())).await
    }

    async fn push(&mut self, socket: &mut WebSocket) -> Step {
        let Some(bundle) = self.pushes.take() else {
            return Ok(());
        };
        let Some((uid, wire)) = &self.agent else { return Ok(()) };
        let frame = match self.owed.take() {
            Some(mut reply) => {
                reply.remote_config = Some(remote_config(&bundle));
                binary(&reply)
            }
            None => binary(&ServerToAgent {
                instance_uid: wire.clone(),
                capabilities: if self.capabilities_sent {
                    0
                } else {
                    capabilities(&self.ctx)
                },
                remote_config: Some(remote_config(&bundle)),
                ..Default::default()
            }),
        };
        self.capabilities_sent = true;
        if self.send(socket, frame).await.is_err() {
            tracing::info!(conn = self.conn, agent = %uid, "a push could not be written in time; closing the WebSocket");
            return Err(None);
        }
        tracing::debug!(agent = %uid, hash = %bundle.hash(), "pushed config");
        self.ctx.fleet.delivered(self.conn, uid.clone(), bundle.hash()).await;
        Ok(())
    }

    /// Sends the reply owed to the first report, if it still is.
    async fn pay(&mut self, socket: &mut WebSocket) -> Step {
        match self.owed.take() {
            Some(reply) => self.send(socket, binary(&reply)).await,
            None => Ok(()),
        }
    }

    /// Reads a frame: the step it ends in, the answer it needs (a heartbeat,
    /// or a uid offered again), or the report to take to the fleet.
    fn read(&mut self, frame: Option<Result<Message, axum::Error>>) -> Read {
        self.last_frame = Instant::now();
        let conn = self.conn;
        let data = match frame {
            None => return Read::Done(Err(None)),
            Some(Err(e)) if is_too_big(&e) => {
                WebSocketMessageTooBig { conn }.emit(&self.ctx.metrics);
                return Read::Done(Err(Some((close::TOO_BIG, "message too big"))));
            }
            Some(Err(e)) => {
                tracing::debug!(conn, error = %e, "WebSocket read failed");
                return Read::Done(Err(None));
            }
            Some(Ok(Message::Binary(data))) => data,
            Some(Ok(Message::Text(_))) => {
                tracing::warn!(conn, "ignored a WebSocket text frame");
                return Read::Done(Ok(()));
            }
            // Pings are answered by the WebSocket layer (pongs only prove
            // the peer is there); a Close is answered there too and then
            // the stream ends.
            Some(Ok(_)) => return Read::Done(Ok(())),
        };
        MessageReceived {
            transport: Transport::WebSocket,
        }
        .emit(&self.ctx.metrics);
        let msg = match codec::decode_ws::<AgentToServer>(&data, self.ctx.max_message_bytes) {
            Ok(msg) => msg,
            Err(DecodeError::TooLarge { .. } | DecodeError::TooMany(_)) => {
                WebSocketMessageTooBig { conn }.emit(&self.ctx.metrics);
                return Read::Done(Err(Some((close::TOO_BIG, "message too big"))));
            }
            Err(e) => {
                WebSocketMessageMalformed { conn, error: &e }.emit(&self.ctx.metrics);
                return Read::Done(Err(Some((close::INVALID_PAYLOAD, "malformed OpAMP message"))));
            }
        };
        if let Some((shared, offered)) = &self.clash
            && shared.as_bytes() == &msg.instance_uid[..]
        {
            return Read::Answer(binary(&ServerToAgent {
                instance_uid: msg.instance_uid,
                agent_identification: Some(AgentIdentification {
                    new_instance_uid: Bytes::copy_from_slice(offered.as_bytes()),
                }),
                ..Default::default()
            }));
        }
        if let (Some((_, wire)), Some((liveness, caps))) = (&self.agent, &self.heartbeats)
            && msg.instance_uid == *wire
            && record::is_heartbeat(&msg, *caps, liveness.sequence_num())
        {
            liveness.touch(SystemTime::now(), msg.sequence_num);
            return Read::Answer(binary(&ServerToAgent {
                instance_uid: msg.instance_uid,
                ..Default::default()
            }));
        }
        Read::Report(Box::new(msg))
    }

    /// Takes a report to the fleet and sends its answer.
    async fn report(&mut self, socket: &mut WebSocket, msg: Box<AgentToServer>) -> Step {
        let conn = self.conn;
        let caps = msg.capabilities;
        let previous = self.agent.as_ref().map(|(uid, _)| uid);
        let via = Via::WebSocket(WsLink {
            conn,
            push: self.pushes.clone(),
            close: self.close.clone(),
        });
        let with_capabilities = !self.capabilities_sent;
        let frame = match answer(
            &self.ctx,
            *msg,
            via,
            previous,
            self.identity.as_ref(),
            with_capabilities,
        )
        .await
        {
            Next::Send(frame, None) => {
                self.heartbeats = None;
                frame
            }
            Next::Send(frame, Some(known)) => {
                self.accepted(known, caps);
                frame
            }
            Next::Owe(reply, known) => {
                self.accepted(known, caps);
                self.owed = Some(reply);
                return Ok(());
            }
            Next::Clash(frame, shared, offered) => {
                self.heartbeats = None;
                self.clash = Some((shared, offered));
                self.capabilities_sent = true;
                frame
            }
            Next::Close(code, reason) => return Err(Some((code, reason))),
        };
        self.send(socket, frame).await
    }

    /// The fleet took a report from the agent on this connection, whose
    /// message had `caps`.
    fn accepted(&mut self, known: Accepted, caps: u64) {
        self.heartbeats = known.liveness.map(|l| (l, caps));
        self.agent = Some((known.uid, known.wire));
        self.capabilities_sent = true;
    }

    /// Closes the connection (with a close frame, when `end` has one) and
    /// tells the fleet.
    async fn end(self, mut socket: WebSocket, end: Option<(u16, &'static str)>) {
        if let Some((code, reason)) = end {
            // A reply still held goes before the close.
            if let Some(reply) = &self.owed {
                send(&mut socket, binary(reply), CLOSE_GRACE).await;
            }
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            if send(&mut socket, Message::Close(Some(frame)), CLOSE_GRACE).await {
                // Wait briefly for the peer's close frame, so it sees a clean close.
                let _ =
                    tokio::time::timeout(CLOSE_GRACE, async { while let Some(Ok(_)) = socket.recv().await {} }).await;
            }
        }
        self.pushes.close();
        drop(socket);
        if let Some((uid, _)) = self.agent {
            self.ctx.fleet.closed(self.conn, uid).await;
        }
        WebSocketClosed.emit(&self.ctx.metrics);
    }
}

/// Completes when `until` has passed; never while there is none.
async fn expiry(until: &mut Option<Pin<Box<Sleep>>>) {
    match until {
        Some(sleep) => sleep.await,
        None => std::future::pending().await,
    }
}

/// Writes `frame`; false when the connection failed or the peer took longer
/// than `within` to take it.
async fn send(socket: &mut WebSocket, frame: Message, within: Duration) -> bool {
    let mut sending = pin!(socket.send(frame));
    // Most frames are written at once: only one that waits is put under
    // the timeout (which reads the clock and takes the timer's handle).
    if let Some(sent) = (&mut sending).now_or_never() {
        return sent.is_ok();
    }
    matches!(tokio::time::timeout(within, sending).await, Ok(Ok(())))
}

/// The encoded frame; messages are encoded before an await so that the
/// (large) message struct is not kept in the connection's future.
fn binary(msg: &ServerToAgent) -> Message {
    Message::Binary(codec::encode_ws(msg).into())
}

/// True when the WebSocket layer refused a frame or message for its size.
fn is_too_big(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error as WsError;
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<WsError>())
        .is_some_and(|e| matches!(e, WsError::Capacity(_)))
}

/// Answers one plain-HTTP OpAMP request: always 200 with a protobuf body
/// (an unreadable or malformed body gets `error_response` BadRequest), except
/// 413 for an oversized body and 408 for one that does not arrive in time.
pub async fn handle_http(ctx: &OpampContext, identity: Option<Identity>, headers: &HeaderMap, body: Body) -> Response {
    MessageReceived {
        transport: Transport::Http,
    }
    .emit(&ctx.metrics);
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    let gzipped = encoding.is_some_and(|e| !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity"));
    let limit = ctx.max_message_bytes;
    // A compressed body may be a little larger than its content; the real
    // limit is checked after inflating.
    let cap = if gzipped {
        limit.saturating_add(limit / 64).saturating_add(4096)
    } else {
        limit
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = match read_body(body, cap, declared, BODY_READ_TIMEOUT).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => return too_large(ctx),
        Err(BodyError::TimedOut) => {
            tracing::debug!("an HTTP body did not arrive in time");
            return (StatusCode::REQUEST_TIMEOUT, [(header::CONNECTION, "close")]).into_response();
        }
        Err(BodyError::Read(e)) => {
            HttpBodyUnreadable { error: &e }.emit(&ctx.metrics);
            let reply = error_reply(
                Bytes::new(),
                ServerErrorResponseType::BadRequest,
                "the request body could not be read".into(),
            );
            return protobuf_response(&reply, false);
        }
    };
    let gzip_reply = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(codec::accepts_gzip);
    let reply = match codec::decode_http::<AgentToServer>(&body, encoding, limit) {
        Err(DecodeError::TooLarge { .. } | DecodeError::TooMany(_)) => return too_large(ctx),
        Err(e) => {
            HttpMessageMalformed { error: &e }.emit(&ctx.metrics);
            error_reply(Bytes::new(), ServerErrorResponseType::BadRequest, e.to_string())
        }
        Ok(msg) => {
            drop(body);
            let wire = msg.instance_uid.clone();
            match exchange(ctx, msg, Via::Http, None, identity.as_ref(), true).await {
                Outcome::Reply { msg, .. } | Outcome::Clash { msg, .. } | Outcome::Refused(msg) => msg,
                Outcome::Busy => return overloaded(ctx, wire),
                Outcome::Forbidden => return StatusCode::FORBIDDEN.into_response(),
                Outcome::Replaced | Outcome::Stopping => error_reply(
                    wire,
                    ServerErrorResponseType::Unavailable,
                    "server shutting down".into(),
                ),
            }
        }
    };
    protobuf_response(&reply, gzip_reply)
}

/// 503 with `Retry-After`, and the same advice in an `error_response` for
/// clients that read only the body.
fn overloaded(ctx: &OpampContext, uid: Bytes) -> Response {
    HttpOverloaded.emit(&ctx.metrics);
    overloaded_response(uid)
}

fn overloaded_response(uid: Bytes) -> Response {
    let mut reply = error_reply(uid, ServerErrorResponseType::Unavailable, "server overloaded".into());
    if let Some(e) = reply.error_response.as_mut() {
        e.details = Some(server_error_response::Details::RetryInfo(RetryInfo {
            retry_after_nanoseconds: RETRY_AFTER_SECS * 1_000_000_000,
        }));
    }
    let mut resp = protobuf_response(&reply, false);
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    resp
}

fn too_large(ctx: &OpampContext) -> Response {
    HttpMessageTooBig.emit(&ctx.metrics);
    StatusCode::PAYLOAD_TOO_LARGE.into_response()
}

/// Replies smaller than this go plain even to clients that accept gzip: for
/// a reply of a few bytes (most are), gzip adds its 18 and a compressor of a
/// few hundred KiB to set up.
const GZIP_AT_LEAST: usize = 1024;

/// The reply as a response: gzipped when `gzip` allows it and the reply is
/// worth compressing.
fn protobuf_response(msg: &ServerToAgent, gzip: bool) -> Response {
    let gzip = gzip && msg.encoded_len() >= GZIP_AT_LEAST;
    let mut resp = Response::new(Body::from(codec::encode_http(msg, gzip)));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_PROTOBUF));
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

#[derive(Debug)]
enum BodyError {
    TooLarge,
    Read(axum::Error),
    TimedOut,
}

/// What to reserve for a body that declares `declared` bytes (already known
/// to be within the cap); the buffer grows as the data arrives.
fn initial_reserve(declared: Option<u64>) -> usize {
    declared.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX).min(BODY_RESERVE))
}

/// [`read_capped`] within `timeout`.
async fn read_body(body: Body, cap: usize, declared: Option<u64>, timeout: Duration) -> Result<Bytes, BodyError> {
    tokio::time::timeout(timeout, read_capped(body, cap, declared))
        .await
        .unwrap_or(Err(BodyError::TimedOut))
}

/// Reads a body of at most `cap` bytes, plain or chunked. A larger one is
/// refused without being buffered (the excess is read and dropped, up to a
/// bound, so the client gets to read our answer).
async fn read_capped(body: Body, cap: usize, declared: Option<u64>) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut oversized = declared.is_some_and(|n| n > cap as u64);
    if !oversized {
        buf.reserve(initial_reserve(declared));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(BodyError::Read)?;
            if buf.len() + chunk.len() > cap {
                oversized = true;
                break;
            }
            buf.extend_from_slice(&chunk);
        }
    }
    if !oversized {
        return Ok(buf.freeze());
    }
    drop(buf);
    let mut drained = 0usize;
    let drain = async {
        while let Some(Ok(chunk)) = stream.next().await {
            drained += chunk.len();
            if drained > OVERSIZE_DRAIN {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    Err(BodyError::TooLarge)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::desired::ConfigFile;

    #[tokio::test]
    async fn overloaded_is_503_with_retry_after_and_the_same_advice_in_protobuf() {
        let resp = overloaded_response(Bytes::from_static(&[7; 16]));
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "30");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], CONTENT_TYPE_PROTOBUF);
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        let msg: ServerToAgent = codec::decode_http(&body, None, 1024).unwrap();
        assert_eq!(&msg.instance_uid[..], &[7; 16]);
        let e = msg.error_response.unwrap();
        assert_eq!(e.r#type, ServerErrorResponseType::Unavailable as i32);
        assert_eq!(
            e.details,
            Some(server_error_response::Details::RetryInfo(RetryInfo {
                retry_after_nanoseconds: 30_000_000_000
            }))
        );
    }

    #[test]
    fn reply_carries_flags_capabilities_identification_and_config() {
        let bundle = Arc::new(ConfigBundle::new(BTreeMap::from([(
            String::new(),
            ConfigFile {
                content_type: "text/yaml".into(),
                body: Bytes::from_static(b"a: 1\n"),
            },
        )])));
        let new_uid = InstanceUid::Uuid([5; 16]);
        let r = Reply {
            report_full_state: true,
            new_instance_uid: Some(new_uid.clone()),
            remote_config: Some(bundle.clone()),
            ..Reply::default()
        };
        let legacy = Bytes::from_static(b"01ARZ3NDEKTSV4RRFFQ69G5FAV");
        let m = reply_message(legacy.clone(), &r, SERVER_CAPABILITIES, None);
        assert_eq!(m.instance_uid, legacy, "the old uid is echoed byte for byte");
        assert_eq!((m.flags, m.capabilities), (1, 7));
        assert!(m.connection_settings.is_none());
        assert_eq!(
            m.agent_identification.unwrap().new_instance_uid.as_ref(),
            new_uid.as_bytes()
        );
        let rc = m.remote_config.unwrap();
        assert_eq!(rc.config_hash.as_ref(), bundle.hash().as_bytes());
        let file = &rc.config.unwrap().config_map[""];
        assert_eq!(
            (file.body.as_ref(), file.content_type.as_str()),
            (&b"a: 1\n"[..], "text/yaml")
        );

        let plain = reply_message(legacy, &Reply::default(), 0, None);
        assert_eq!((plain.flags, plain.capabilities), (0, 0));
        assert!(plain.remote_config.is_none() && plain.agent_identification.is_none());
    }

    #[tokio::test]
    async fn only_replies_worth_compressing_are_gzipped() {
        let uid = Bytes::from_static(&[3; 16]);
        let config = |body: &str| {
            let bundle = ConfigBundle::new(BTreeMap::from([(
                String::new(),
                ConfigFile {
                    content_type: "text/yaml".into(),
                    body: Bytes::copy_from_slice(body.as_bytes()),
                },
            )]));
            ServerToAgent {
                instance_uid: uid.clone(),
                remote_config: Some(remote_config(&bundle)),
                ..Default::default()
            }
        };
        let small = config("a: 1\n");
        let large = config(&"key: value\n".repeat(200));
        for (msg, gzip, gzipped) in [(&small, true, false), (&large, false, false), (&large, true, true)] {
            let resp = protobuf_response(msg, gzip);
            let encoding = resp.headers().get(header::CONTENT_ENCODING).cloned();
            assert_eq!(encoding.is_some(), gzipped, "{} bytes, gzip {gzip}", msg.encoded_len());
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
            let encoding = encoding.as_ref().map(|e| e.to_str().unwrap());
            assert_eq!(
                &codec::decode_http::<ServerToAgent>(&body, encoding, 1 << 20).unwrap(),
                msg
            );
            if gzipped {
                assert!(body.len() < msg.encoded_len() / 4, "{} bytes gzipped", body.len());
            }
        }
    }

    #[tokio::test]
    async fn a_heartbeat_is_offered_only_to_agents_that_report_heartbeats_and_do_not_take_connection_settings() {
        let (fleet, _task) = crate::fleet::spawn(
            crate::fleet::FleetConfig {
                heartbeat_interval: Duration::from_secs(30),
                retention: crate::fleet::DEFAULT_RETENTION,
                bindings_file: None,
            },
            tokio_util::sync::CancellationToken::new(),
        )
        .unwrap();
        let mut ctx = OpampContext::new(
            fleet,
            Default::default(),
            1 << 20,
            Default::default(),
            Default::default(),
            Duration::from_secs(30),
        );
        assert_eq!(capabilities(&ctx), 0x7);
        assert!(
            heartbeat_offer(&ctx, 0x2003).is_none(),
            "nothing offered unless configured"
        );
        ctx.offer_heartbeat = Some(Duration::from_secs(5));
        assert_eq!(capabilities(&ctx), 0x27, "OffersConnectionSettings");
        let offer = heartbeat_offer(&ctx, 0x1 | 0x2 | 0x2000).expect("offered");
        assert_eq!(offer.opamp.as_ref().map(|o| o.heartbeat_interval_seconds), Some(5));
        assert_eq!(offer.hash.len(), 32);
        assert_eq!(heartbeat_offer(&ctx, 0x2003).unwrap().hash, offer.hash, "a stable hash");
        assert!(heartbeat_offer(&ctx, 0x3).is_none(), "no ReportsHeartbeat");
        assert!(
            heartbeat_offer(&ctx, 0x2103).is_none(),
            "AcceptsOpAMPConnectionSettings: an offer would replace its whole connection"
        );
    }

    #[test]
    fn the_declared_length_reserves_at_most_64_kib() {
        assert_eq!(initial_reserve(None), 0);
        assert_eq!(initial_reserve(Some(300)), 300);
        assert_eq!(initial_reserve(Some(16 * 1024 * 1024)), BODY_RESERVE);
        assert_eq!(initial_reserve(Some(u64::MAX)), BODY_RESERVE);
    }

    #[tokio::test]
    async fn a_body_larger_than_the_reserve_is_read_whole() {
        let data: Vec<u8> = (0..200 * 1024).map(|i| i as u8).collect();
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            data.chunks(7000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let body = Body::from_stream(futures_util::stream::iter(chunks));
        let r = read_body(body, 1024 * 1024, Some(data.len() as u64), BODY_READ_TIMEOUT).await;
        assert_eq!(r.ok().as_deref(), Some(&data[..]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_times_out() {
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"0123456789"))]);
        let stalled = Body::from_stream(first.chain(futures_util::stream::pending()));
        let started = tokio::time::Instant::now();
        let r = read_body(stalled, 1024, Some(100), BODY_READ_TIMEOUT).await;
        assert!(matches!(r, Err(BodyError::TimedOut)), "got {r:?}");
        assert_eq!(started.elapsed(), BODY_READ_TIMEOUT);

        let whole = Body::from(Bytes::from_static(b"abc"));
        let r = read_body(whole, 1024, Some(3), BODY_READ_TIMEOUT).await;
        assert_eq!(r.ok().as_deref(), Some(&b"abc"[..]));
    }
}
