//! A scripted controller for tests of the agent side of `AgentService.Connect` (cargo feature `testing`, enabled
//! by the dev-dependencies of this crate and of `kiln-agent`; never in a release build).
//!
//! [`StubController`] refuses a stream that does not open with `Register`, answers `Registered`, then sends the
//! commands its script gives for that registration and connection number. By default the stream then stays open
//! until [`StubController::break_streams`] ends every open one with `UNAVAILABLE` (as a controller restart does);
//! [`StubController::end_after_commands`] ends it after the script instead. [`StubController::inbox`] forwards
//! every agent message (the `Register` included) to an [`Inbox`] the test reads.

use std::{
    fmt,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{broadcast, mpsc},
    task::JoinHandle,
};
use tokio_stream::{
    Stream, StreamExt,
    wrappers::{ReceiverStream, TcpListenerStream},
};
use tonic::{Request, Response, Status, Streaming};

use crate::v1::{
    AgentMessage, Command, ControllerMessage, Register, Registered, agent_message,
    agent_service_server::{AgentService, AgentServiceServer},
    controller_message,
};

/// The commands to send after `Registered`, given the registration and the connection's number (0 for the first).
pub type Script = Arc<dyn Fn(&Register, usize) -> Vec<Command> + Send + Sync>;

/// A scripted `AgentService` (see the module docs). Clones share their connection count and stream breaker.
#[derive(Clone)]
pub struct StubController {
    registered: Registered,
    script: Script,
    seen: Option<mpsc::UnboundedSender<AgentMessage>>,
    end_after_commands: bool,
    connections: Arc<AtomicUsize>,
    breaker: broadcast::Sender<()>,
}

impl fmt::Debug for StubController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StubController")
            .field("registered", &self.registered)
            .field("forwards", &self.seen.is_some())
            .field("end_after_commands", &self.end_after_commands)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl StubController {
    /// A controller answering every registration with `registered` and sending no command.
    pub fn new(registered: Registered) -> Self {
        Self {
            registered,
            script: Arc::new(|_, _| Vec::new()),
            seen: None,
            end_after_commands: false,
            connections: Arc::new(AtomicUsize::new(0)),
            breaker: broadcast::channel(4).0,
        }
    }

    /// Sends what `script` gives after `Registered`.
    #[must_use]
    pub fn commands(mut self, script: impl Fn(&Register, usize) -> Vec<Command> + Send + Sync + 'static) -> Self {
        self.script = Arc::new(script);
        self
    }

    /// Ends each stream after its commands.
    #[must_use]
    pub fn end_after_commands(mut self) -> Self {
        self.end_after_commands = true;
        self
    }

    /// Forwards every agent message to the returned inbox.
    #[must_use]
    pub fn inbox(mut self) -> (Self, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.seen = Some(tx);
        (self, Inbox { rx, backlog: Vec::new() })
    }

    /// Streams opened so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Ends every open stream with `UNAVAILABLE`.
    pub fn break_streams(&self) {
        let _ = self.breaker.send(());
    }

    /// Serves this controller on an ephemeral loopback port: its address and the server task.
    pub async fn serve_on_loopback(
        self,
    ) -> std::io::Result<(SocketAddr, JoinHandle<Result<(), tonic::transport::Error>>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(self))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok((addr, server))
    }
}

type Outbound = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for StubController {
    type ConnectStream = Outbound;

    async fn connect(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<Outbound>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let Some(agent_message::Body::Register(register)) = first.body.clone() else {
            return Err(Status::failed_precondition("the first message must be Register"));
        };
        let connection = self.connections.fetch_add(1, Ordering::SeqCst);
        if let Some(seen) = self.seen.clone() {
            let _ = seen.send(first);
            tokio::spawn(async move {
                while let Some(Ok(m)) = inbound.next().await {
                    let _ = seen.send(m);
                }
            });
        }
        let bodies = std::iter::once(controller_message::Body::Registered(self.registered.clone()))
            .chain((self.script)(&register, connection).into_iter().map(controller_message::Body::Command));
        let script = tokio_stream::iter(bodies.map(|b| Ok(ControllerMessage { body: Some(b) })).collect::<Vec<_>>());
        if self.end_after_commands {
            return Ok(Response::new(Box::pin(script)));
        }
        let mut breaker = self.breaker.subscribe();
        let (broken_tx, broken) = mpsc::channel(1);
        tokio::spawn(async move {
            let _ = breaker.recv().await;
            let _ = broken_tx.send(Err(Status::unavailable("controller restarting"))).await;
        });
        Ok(Response::new(Box::pin(script.chain(ReceiverStream::new(broken)))))
    }
}

/// What a [`StubController`] received, searched in order; messages not yet asked for are kept.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<AgentMessage>,
    backlog: Vec<AgentMessage>,
}

/// How long [`Inbox::next`] waits.
pub const INBOX_WAIT: Duration = Duration::from_secs(10);

impl Inbox {
    /// The first message whose body matches `what` (from the backlog, else as it arrives), within
    /// [`INBOX_WAIT`]; `None` when none came in time. Messages passed over are kept for later calls.
    pub async fn next(&mut self, what: impl Fn(&agent_message::Body) -> bool) -> Option<AgentMessage> {
        if let Some(i) = self.backlog.iter().position(|m| m.body.as_ref().is_some_and(&what)) {
            return Some(self.backlog.remove(i));
        }
        let wait = async {
            while let Some(m) = self.rx.recv().await {
                if m.body.as_ref().is_some_and(&what) {
                    return Some(m);
                }
                self.backlog.push(m);
            }
            None
        };
        tokio::time::timeout(INBOX_WAIT, wait).await.ok().flatten()
    }

    /// The next message in arrival order (the backlog first); `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<AgentMessage> {
        if !self.backlog.is_empty() {
            return Some(self.backlog.remove(0));
        }
        self.rx.recv().await
    }

    /// Forgets the messages passed over so far.
    pub fn clear_backlog(&mut self) {
        self.backlog.clear();
    }
}
