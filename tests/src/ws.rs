//! A call handler's WebSocket: the handshake through an agent's local
//! listener (plain HTTP, as a call handler sends it) with tokio-tungstenite,
//! echo round trips, and waiting for the agent to close the stream.

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{WebSocketStream, client_async};

/// The control plane's echo stream.
pub const ECHO: &str = "/v1/streams/echo";

/// An open stream and the path the agent put it on (`X-Detour-Path`).
pub struct Stream {
    pub ws: WebSocketStream<TcpStream>,
    pub path: String,
}

/// What a handshake got back.
pub enum Handshake {
    /// `101`: the stream is open.
    Open(Box<Stream>),
    /// Any other answer: status, headers, body.
    Refused(http::Response<Option<Vec<u8>>>),
}

/// Opens a WebSocket to `target` (a path) through the agent at `local`
/// (`http://127.0.0.1:port`), pinned to `pin` when given.
pub async fn handshake(local: &str, target: &str, pin: Option<&str>) -> anyhow::Result<Handshake> {
    let addr = local
        .strip_prefix("http://")
        .context("local URL is http://host:port")?;
    let mut req = format!("ws://{addr}{target}").into_client_request()?;
    if let Some(p) = pin {
        req.headers_mut()
            .insert(detour_wire::headers::PIN, HeaderValue::from_str(p)?);
    }
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match client_async(req, tcp).await {
        Ok((ws, resp)) => {
            let path = resp
                .headers()
                .get(detour_wire::headers::PATH)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            Ok(Handshake::Open(Box::new(Stream { ws, path })))
        }
        Err(tungstenite::Error::Http(resp)) => Ok(Handshake::Refused(*resp)),
        Err(e) => Err(e.into()),
    }
}

/// Opens the echo stream, or says why not.
pub async fn open_echo(local: &str, pin: Option<&str>) -> anyhow::Result<Stream> {
    match handshake(local, ECHO, pin).await? {
        Handshake::Open(s) => Ok(*s),
        Handshake::Refused(r) => bail!(
            "handshake answered {}: {}",
            r.status(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default())
        ),
    }
}

impl Stream {
    /// Sends `msg` and waits (at most `within`) for the same message back.
    pub async fn echo(&mut self, msg: Message, within: Duration) -> anyhow::Result<()> {
        self.ws.send(msg.clone()).await?;
        let deadline = Instant::now() + within;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .context("no echo in time")?;
            match next {
                Some(Ok(m)) if m == msg => return Ok(()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => bail!("echo was {m:?}, not what was sent"),
                Some(Err(e)) => bail!("stream broke: {e}"),
                None => bail!("stream closed"),
            }
        }
    }

    /// Waits (at most `within`) until the other end closes the stream or it
    /// breaks; `Err` if it is still open then.
    pub async fn closed(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => bail!("still open after {within:?}"),
                Ok(None | Some(Err(_))) => return Ok(()),
                Ok(Some(Ok(Message::Close(_)))) => return Ok(()),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}
