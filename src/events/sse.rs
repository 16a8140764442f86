//! `GET /events/stream`: the same events as Server-Sent Events, for
//! `curl -N` and `EventSource`. Each event is `id:` (the event id),
//! `event:` (its type) and `data:` (the JSON envelope); control messages
//! have no id. A comment line every `ping_interval_secs` keeps proxies from
//! closing an idle stream. Resume with `Last-Event-ID` or `?since=`.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::admission::{self, Admission, StreamQuery, StreamSlot, Transport};
use super::credential::CredentialWatch;
use super::session::{self, Outgoing, StreamSession};
use crate::error::ApiError;
use crate::server::AppState;

/// Frames buffered between the session task and the HTTP body.
const BUFFER: usize = 256;

pub async fn sse_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(query)) => query,
        Err(e) => return ApiError::bad_request("invalid_query", e.body_text()).into_response(),
    };
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok());
    let admission =
        match admission::admit(&state, &headers, &query, last_event_id, Transport::Sse).await {
            Ok(admission) => admission,
            Err(error) => return error.into_response(),
        };
    let keepalive = Duration::from_secs(admission.settings.ping_interval_secs);
    let (tx, rx) = mpsc::channel(BUFFER);
    // Subscribed here, not in the task: every event published after the
    // response begins reaches the stream, however late the task first runs.
    let Admission {
        filter,
        since,
        slot,
        ..
    } = admission;
    let opened = StreamSession::open(&state.hub, filter, since);
    state
        .stream_tasks
        .clone()
        .spawn(run_stream(state, opened, slot, tx));
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(keepalive).text("keepalive"))
        .into_response()
}

fn to_sse(out: &Outgoing) -> Event {
    let event = Event::default().event(out.kind()).data(out.json().as_str());
    match out {
        Outgoing::Event(stored) => event.id(stored.id.to_string()),
        Outgoing::Control { .. } => event,
    }
}

type Sender = mpsc::Sender<Result<Event, Infallible>>;

async fn send(tx: &Sender, out: &Outgoing) -> bool {
    let sent = tx.send(Ok(to_sse(out))).await.is_ok();
    if sent && matches!(out, Outgoing::Event(_)) {
        metrics::counter!("tollgate_stream_frames_delivered_total", "transport" => "sse")
            .increment(1);
    }
    sent
}

async fn run_stream(
    state: AppState,
    (mut session, opening): (StreamSession, Vec<Outgoing>),
    slot: StreamSlot,
    tx: Sender,
) {
    let mut credential = CredentialWatch::new(&state, &session.filter.identity);
    for out in &opening {
        if !send(&tx, out).await {
            return;
        }
    }
    loop {
        tokio::select! {
            biased;
            _ = state.shutdown.cancelled() => {
                while let Ok(Some(out)) = session.try_next() {
                    if !send(&tx, &out).await {
                        break;
                    }
                }
                break;
            }
            _ = tx.closed() => break,
            ended = credential.ended() => {
                let (reason, code) = ended.reason();
                let _ = send(&tx, &session::error_frame(code, &format!("{reason}: this stream is closed"))).await;
                break;
            }
            next = session.next() => {
                let Ok(out) = next else { break };
                if !send(&tx, &out).await {
                    break;
                }
            }
        }
    }
    drop(slot);
}
