//! Real event-stream clients for the tests: a WebSocket client
#![allow(dead_code)]
//! (tokio-tungstenite) and an SSE reader over a raw HTTP response, each
//! reading frames with a deadline so that a missing frame fails the test
//! instead of hanging it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a client waits for a frame that should come.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// An upgrade the server refused: its status and JSON body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<String>,
}

pub struct WsClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What ended a read.
#[derive(Debug)]
pub enum Read {
    Json(Value),
    Close(Option<CloseFrame>),
}

impl WsClient {
    /// Connects to `ws://ADDR/ws/events?QUERY`, optionally with a bearer token.
    pub async fn connect(
        addr: std::net::SocketAddr,
        query: &str,
        bearer: Option<&str>,
    ) -> Result<WsClient, Refused> {
        let authorization = bearer.map(|token| format!("Bearer {token}"));
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|value| ("authorization", value.as_str()))
            .collect();
        WsClient::connect_with(addr, query, &headers).await
    }

    /// Connects to `ws://ADDR/ws/events?QUERY` with extra request headers
    /// (`cookie`, `origin`, …).
    pub async fn connect_with(
        addr: std::net::SocketAddr,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, Refused> {
        let url = if query.is_empty() {
            format!("ws://{addr}/ws/events")
        } else {
            format!("ws://{addr}/ws/events?{query}")
        };
        let mut request = url.into_client_request().expect("a valid request");
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        match tokio::time::timeout(FRAME_DEADLINE, tokio_tungstenite::connect_async(request)).await
        {
            Err(_) => panic!("the WebSocket handshake did not finish in time"),
            Ok(Ok((ws, _))) => Ok(WsClient { ws }),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body = response
                    .body()
                    .as_ref()
                    .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                    .unwrap_or(Value::Null);
                Err(Refused {
                    status,
                    body,
                    retry_after,
                })
            }
            Ok(Err(e)) => panic!("WebSocket connect failed: {e}"),
        }
    }

    /// Connects and reads the `connected` frame, which must come first.
    pub async fn open(
        addr: std::net::SocketAddr,
        query: &str,
        bearer: Option<&str>,
    ) -> (WsClient, Value) {
        let mut client = WsClient::connect(addr, query, bearer)
            .await
            .unwrap_or_else(|r| panic!("the stream was refused: {r:?}"));
        let first = client.next_json().await;
        assert_eq!(
            first["type"], "connected",
            "the first frame is `connected`: {first}"
        );
        (client, first)
    }

    /// The next text frame or close, skipping pings and pongs.
    pub async fn read(&mut self) -> Read {
        self.read_within(FRAME_DEADLINE)
            .await
            .unwrap_or_else(|| panic!("no frame within {FRAME_DEADLINE:?}"))
    }

    /// Like [`WsClient::read`], `None` when nothing arrives in `timeout`.
    pub async fn read_within(&mut self, timeout: Duration) -> Option<Read> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(message) => message,
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    let value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
                    return Some(Read::Json(value));
                }
                Some(Ok(Message::Close(frame))) => return Some(Read::Close(frame)),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(_))) => panic!("the server sent a binary frame"),
                Some(Err(_)) | None => return Some(Read::Close(None)),
            }
        }
    }

    /// The next JSON frame; panics on a close.
    pub async fn next_json(&mut self) -> Value {
        match self.read().await {
            Read::Json(value) => value,
            Read::Close(frame) => {
                panic!("the stream closed ({frame:?}) while a frame was expected")
            }
        }
    }

    /// Reads until a frame of `kind` arrives and returns it; panics on a close.
    pub async fn until_type(&mut self, kind: &str) -> Value {
        loop {
            let value = self.next_json().await;
            if value["type"] == kind {
                return value;
            }
        }
    }

    /// Every frame before the event with id `id` (a marker the test
    /// published, so everything published before it has been seen); the
    /// marker itself is read and left out. Panics on a close.
    pub async fn until_id(&mut self, id: u64) -> Vec<Value> {
        let id = id.to_string();
        let mut frames = Vec::new();
        loop {
            let value = self.next_json().await;
            if value["id"] == id.as_str() {
                return frames;
            }
            frames.push(value);
        }
    }

    /// Reads until the close frame and returns its code; panics if another
    /// kind of frame than `allowed` types arrives first.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.read().await {
                Read::Json(_) => continue,
                Read::Close(frame) => return frame.map(|f| u16::from(f.code)),
            }
        }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("send a client message");
    }

    pub async fn send(&mut self, message: Message) {
        self.ws.send(message).await.expect("send a client message");
    }
}

/// The `data:` JSON of each SSE event and the `id:` and `event:` lines, from
/// a response body read incrementally.
pub struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Value,
}

impl SseClient {
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<SseClient, Refused> {
        let client = reqwest::Client::new();
        let mut request = client.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = tokio::time::timeout(FRAME_DEADLINE, request.send())
            .await
            .expect("the SSE request is answered in time")
            .expect("the SSE request succeeds at the HTTP level");
        if !response.status().is_success() {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = response.json().await.unwrap_or(Value::Null);
            return Err(Refused {
                status,
                body,
                retry_after,
            });
        }
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Ok(SseClient {
            response,
            buffer: String::new(),
        })
    }

    /// The next raw block (lines up to a blank line), comments included.
    pub async fn next_block(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block = self.buffer[..end].to_owned();
                self.buffer.drain(..end + 2);
                return Some(block);
            }
            let chunk = tokio::time::timeout(FRAME_DEADLINE, self.response.chunk())
                .await
                .expect("an SSE chunk arrives in time")
                .expect("the SSE body reads")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// The next event, skipping comment-only blocks (keepalives).
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let block = self.next_block().await?;
            let (mut id, mut event, mut data) = (None, None, String::new());
            for line in block.lines() {
                if let Some(v) = line
                    .strip_prefix("id: ")
                    .or_else(|| line.strip_prefix("id:"))
                {
                    id = Some(v.to_owned());
                } else if let Some(v) = line
                    .strip_prefix("event: ")
                    .or_else(|| line.strip_prefix("event:"))
                {
                    event = Some(v.to_owned());
                } else if let Some(v) = line
                    .strip_prefix("data: ")
                    .or_else(|| line.strip_prefix("data:"))
                {
                    data.push_str(v);
                }
            }
            if data.is_empty() {
                continue;
            }
            return Some(SseEvent {
                id,
                event,
                data: serde_json::from_str(&data).expect("SSE data is JSON"),
            });
        }
    }
}
