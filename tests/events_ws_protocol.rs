//! `/ws/events` at the WebSocket protocol level (RFC 6455), against a real
//! server on 127.0.0.1:0: the opening handshake and its refusals, control
//! frames from the client, fragmented and oversized messages, protocol
//! errors, and the close handshake. Some clients here write raw bytes on a
//! TCP socket, because a well-behaved client library cannot send the
//! frames under test.

#[path = "support/stream_client.rs"]
mod stream_client;
mod support;

use std::net::SocketAddr;

use futures::SinkExt;
use serde_json::{json, Value};
use stream_client::{WsClient, FRAME_DEADLINE};
use support::{marker, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// Sends an HTTP request on a fresh connection and returns the connection
/// with the response head (status line and headers) and any bytes after it.
async fn raw_request(addr: SocketAddr, head: &str) -> (TcpStream, String, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let end = loop {
        read_more(&mut tcp, &mut received, "the response head").await;
        if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8(received[..end].to_vec()).unwrap();
    (tcp, head, received[end..].to_vec())
}

fn handshake_request(addr: SocketAddr, extra: &[&str]) -> String {
    let mut request = format!("GET /ws/events HTTP/1.1\r\nHost: {addr}\r\n");
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

const GOOD: &[&str] = &[
    "Connection: Upgrade",
    "Upgrade: websocket",
    "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
];

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The JSON body of a refused handshake (read to the end of the response).
async fn refusal(addr: SocketAddr, lines: &[&str]) -> (u16, String, Value) {
    let mut request = handshake_request(addr, lines);
    request.insert_str(request.len() - 2, "Connection: close\r\n");
    // `Connection: close` must not hide a missing `Connection: upgrade`;
    // where the test keeps `Connection: Upgrade`, both are sent.
    let (mut tcp, head, mut body) = raw_request(addr, &request).await;
    tokio::time::timeout(FRAME_DEADLINE, tcp.read_to_end(&mut body))
        .await
        .expect("the refusal ends in time")
        .unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, head, body)
}

#[tokio::test]
async fn the_opening_handshake_is_answered_per_rfc_6455_and_bad_ones_are_refused_with_json() {
    // One stream slot: a refused handshake that kept its slot would turn the
    // next request into a 503, and the final, good handshake would fail.
    let server = TestServer::start(|config| {
        config.features.websocket.max_connections = 1;
    })
    .await;
    let addr = server.addr;

    // A plain GET, as a browser tab or curl without upgrade headers sends.
    let (status, _, body) = refusal(addr, &[]).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "invalid_websocket_handshake");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/events/stream"),
        "{body}"
    );

    // No key, a key that is not 16 bytes of base64, no `Upgrade`.
    for lines in [
        &GOOD[..3],
        &[GOOD[0], GOOD[1], GOOD[2], "Sec-WebSocket-Key: short"][..],
        &[GOOD[0], GOOD[2], GOOD[3]][..],
    ] {
        let (status, _, body) = refusal(addr, lines).await;
        assert_eq!(status, 400, "{lines:?}");
        assert_eq!(body["error"]["code"], "invalid_websocket_handshake");
    }

    // An old protocol version: 426 with the version this server speaks.
    let (status, head, body) = refusal(
        addr,
        &[GOOD[0], GOOD[1], "Sec-WebSocket-Version: 8", GOOD[3]],
    )
    .await;
    assert_eq!(status, 426);
    assert_eq!(header(&head, "sec-websocket-version"), Some("13"));
    assert_eq!(body["error"]["code"], "unsupported_websocket_version");

    // RFC 6455 §1.3's example key gets the example's accept value, and the
    // stream starts with `connected` right after the 101 — in the one slot,
    // which none of the refusals above kept.
    let (mut tcp, head, mut rest) = raw_request(addr, &handshake_request(addr, GOOD)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header(&head, "sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    assert_eq!(
        header(&head, "upgrade").map(str::to_ascii_lowercase),
        Some("websocket".into())
    );
    let (opcode, payload) = read_frame(&mut tcp, &mut rest).await;
    assert_eq!(opcode, 0x1, "a text frame");
    let connected: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(connected["type"], "connected");
    server.shutdown().await;
}

/// Reads one server frame (never masked) from `tcp`, `buffer` holding bytes
/// already received.
async fn read_frame(tcp: &mut TcpStream, buffer: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if buffer.len() >= 2 {
            let (length, header) = match buffer[1] & 0x7f {
                126 if buffer.len() >= 4 => {
                    (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4)
                }
                127 if buffer.len() >= 10 => (
                    u64::from_be_bytes(buffer[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => (usize::MAX, 0),
                short => (short as usize, 2),
            };
            assert_eq!(buffer[1] & 0x80, 0, "server frames are not masked");
            if length != usize::MAX && buffer.len() >= header + length {
                let opcode = buffer[0] & 0x0f;
                assert_eq!(buffer[0] & 0x80, 0x80, "server frames are final");
                let payload = buffer[header..header + length].to_vec();
                buffer.drain(..header + length);
                return (opcode, payload);
            }
        }
        read_more(tcp, buffer, "a frame").await;
    }
}

/// Appends what the next read brings; panics if nothing comes in time or
/// the connection ends while `what` is expected.
async fn read_more(tcp: &mut TcpStream, buffer: &mut Vec<u8>, what: &str) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(FRAME_DEADLINE, tcp.read(&mut chunk))
        .await
        .unwrap_or_else(|_| panic!("no {what} in time"))
        .unwrap();
    assert!(n > 0, "the connection ended before {what}");
    buffer.extend_from_slice(&chunk[..n]);
}

#[tokio::test]
async fn an_unmasked_client_frame_is_a_protocol_error_closed_with_1002() {
    let server = TestServer::start(|_| {}).await;
    let (mut tcp, head, mut rest) =
        raw_request(server.addr, &handshake_request(server.addr, GOOD)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (_, connected) = read_frame(&mut tcp, &mut rest).await;
    assert!(String::from_utf8_lossy(&connected).contains("\"connected\""));
    // `{"type":"ping"}` as an unmasked text frame: RFC 6455 §5.1 says the
    // server must close the connection.
    let message = br#"{"type":"ping"}"#;
    let mut frame = vec![0x81, message.len() as u8];
    frame.extend_from_slice(message);
    tcp.write_all(&frame).await.unwrap();
    let (opcode, payload) = read_frame(&mut tcp, &mut rest).await;
    assert_eq!(opcode, 0x8, "a close frame, not a pong message");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1002);
    server.shutdown().await;
}

#[tokio::test]
async fn client_pings_are_ponged_and_fragmented_messages_are_reassembled() {
    let server = TestServer::start(|_| {}).await;
    let (mut client, _) = WsClient::open(server.addr, "topics=system", None).await;

    // A Ping from the client gets a Pong with the same payload.
    client
        .send(Message::Ping(b"are you there".to_vec().into()))
        .await;
    let pong = tokio::time::timeout(FRAME_DEADLINE, async {
        loop {
            use futures::StreamExt;
            match client.ws.next().await {
                Some(Ok(Message::Pong(data))) => return data,
                Some(Ok(_)) => continue,
                other => panic!("the connection ended before the pong: {other:?}"),
            }
        }
    })
    .await
    .expect("a pong in time");
    assert_eq!(&pong[..], b"are you there");

    // A subscribe message split over three frames (a text frame and two
    // continuations) is one message, answered once.
    let message = json!({"type": "subscribe", "topics": ["usage"]}).to_string();
    let bytes = message.as_bytes();
    let (a, rest) = bytes.split_at(7);
    let (b, c) = rest.split_at(9);
    for (i, part) in [a, b, c].into_iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(part.to_vec(), opcode, i == 2);
        client.send(Message::Frame(frame)).await;
    }
    let subscribed = client.next_json().await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    assert_eq!(subscribed["payload"]["topics"], json!(["usage", "system"]));

    // And the stream goes on: the next event arrives after the answer.
    let event = server.state.hub.publish(marker(1));
    assert_eq!(client.next_json().await["id"], event.id.to_string());
    server.shutdown().await;
}

#[tokio::test]
async fn a_message_far_over_the_protocol_layers_own_limit_also_closes_with_1009() {
    let server = TestServer::start(|_| {}).await;
    let (mut client, _) = WsClient::open(server.addr, "", None).await;
    // 1 MiB: past the protocol layer's own ceiling (256 KiB), so it is
    // refused as a capacity error rather than read whole, and must still be
    // answered with 1009 rather than a reset.
    client
        .ws
        .send(Message::Text("a".repeat(1024 * 1024).into()))
        .await
        .ok();
    assert_eq!(client.close_code().await, Some(1009));
    server.shutdown().await;
}

#[tokio::test]
async fn a_client_close_is_answered_and_frees_the_slot() {
    let server = TestServer::start(|config| {
        config.features.websocket.max_connections = 1;
    })
    .await;
    let (mut client, _) = WsClient::open(server.addr, "", None).await;
    client
        .send(Message::Close(Some(CloseFrame {
            code: 1000.into(),
            reason: "done".into(),
        })))
        .await;
    // The server answers the close with the same code.
    assert_eq!(client.close_code().await, Some(1000));
    // And the one slot is free again.
    support::wait_until("the slot is freed", FRAME_DEADLINE, || async {
        WsClient::connect(server.addr, "", None).await.is_ok()
    })
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn events_of_every_length_form_arrive_intact_and_in_order() {
    use tollgate::events::model::ConfigReloadFailed;
    let server = TestServer::start(|_| {}).await;
    let (mut client, _) = WsClient::open(server.addr, "topics=system", None).await;
    // Envelopes under 126 bytes are impossible (the envelope alone is
    // longer), so: a 16-bit length, one just over 64 KiB (64-bit length),
    // and enough of them back to back to fill several batches.
    let mut published = Vec::new();
    for size in [10usize, 500, 70_000, 200, 140_000, 5] {
        published.push(server.state.hub.publish(ConfigReloadFailed {
            error: "x".repeat(size),
        }));
    }
    for event in &published {
        let frame = client.next_json().await;
        assert_eq!(frame["id"], event.id.to_string());
        assert_eq!(frame.to_string().len(), event.json.len());
        assert_eq!(frame, serde_json::from_str::<Value>(&event.json).unwrap());
    }
    server.shutdown().await;
}
