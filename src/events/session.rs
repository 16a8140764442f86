//! One subscriber's view of the hub, shared by the WebSocket and SSE
//! transports: the opening frames (`connected`, `resume_failed`, replay),
//! then live events through the connection's filter, with a lag turned into
//! one `lagged` frame that says exactly how many wanted events were missed.
//!
//! Transports only move frames; filtering and lag accounting live here, and
//! serialisation of events happened once, in the hub.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use super::hub::{EventHub, Resume, StoredEvent, Subscription};
use super::model::Topic;
use super::visibility::StreamFilter;
use crate::auth::Identity;

/// Version of the client protocol, sent in `connected`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Something to send to the client.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A published event, its envelope already serialised.
    Event(Arc<StoredEvent>),
    /// A control message (`connected`, `lagged`, …) of this connection.
    Control { kind: &'static str, json: Utf8Bytes },
}

impl Outgoing {
    pub fn json(&self) -> &Utf8Bytes {
        match self {
            Outgoing::Event(event) => &event.json,
            Outgoing::Control { json, .. } => json,
        }
    }

    /// The name a transport labels the frame with (SSE's `event:` line).
    pub fn kind(&self) -> &'static str {
        match self {
            Outgoing::Event(event) => event.event_type.as_str(),
            Outgoing::Control { kind, .. } => kind,
        }
    }
}

/// A control message: `{"type": kind, "payload": payload}`.
pub fn control(kind: &'static str, payload: Value) -> Outgoing {
    let json = json!({ "type": kind, "payload": payload }).to_string();
    Outgoing::Control {
        kind,
        json: Utf8Bytes::from(json),
    }
}

/// An `error` control message; the connection stays open.
pub fn error_frame(code: &str, message: &str) -> Outgoing {
    control("error", json!({ "code": code, "message": message }))
}

pub fn topics_frame(kind: &'static str, filter: &StreamFilter) -> Outgoing {
    control(kind, json!({ "topics": topic_names(filter) }))
}

fn topic_names(filter: &StreamFilter) -> Vec<&'static str> {
    filter
        .topics
        .topics()
        .into_iter()
        .map(Topic::as_str)
        .collect()
}

fn identity_json(identity: &Identity) -> Value {
    match identity {
        Identity::Anonymous => json!({ "kind": "anonymous" }),
        Identity::Key(key) => json!({
            "kind": "api_key",
            "key_id": key.id,
            "name": key.name,
            "admin": key.admin,
        }),
        Identity::User(user) => json!({
            "kind": "user",
            "subject": user.subject,
            "name": user.name,
            "admin": user.admin,
        }),
    }
}

/// Why [`StreamSession::next`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The hub is gone (the server is stopping).
    HubClosed,
}

/// A subscriber: filter, live receiver and the id of the last event seen.
pub struct StreamSession {
    pub connection_id: Uuid,
    pub filter: StreamFilter,
    hub: EventHub,
    receiver: tokio::sync::broadcast::Receiver<Arc<StoredEvent>>,
    /// How many events `receiver` may fall behind before it lags.
    channel_capacity: usize,
    /// The newest event id this session has passed (delivered or filtered
    /// out), so a lag can say where to resume from.
    last_seen: u64,
}

impl StreamSession {
    /// Subscribes and returns the session with its opening frames:
    /// `connected`, then `resume_failed` if the cursor was too old, then the
    /// replayed events this connection may see.
    pub fn open(
        hub: &EventHub,
        filter: StreamFilter,
        since: Option<u64>,
    ) -> (StreamSession, Vec<Outgoing>) {
        let Subscription {
            replay,
            resume,
            receiver,
            last_id,
            channel_capacity,
        } = hub.subscribe(since);
        let connection_id = Uuid::new_v4();
        let mut opening = vec![control(
            "connected",
            json!({
                "connection_id": connection_id,
                "identity": identity_json(&filter.identity),
                "topics": topic_names(&filter),
                "protocol_version": PROTOCOL_VERSION,
                "resumed": resume == Resume::Resumed,
                // The newest event before this stream's live part: a client
                // that drops before receiving any event resumes from here.
                "last_id": last_id.to_string(),
            }),
        )];
        match resume {
            Resume::Failed { oldest_available } => {
                metrics::counter!("tollgate_stream_resumes_total", "outcome" => "failed")
                    .increment(1);
                opening.push(control(
                    "resume_failed",
                    json!({
                        "since": since.map(|s| s.to_string()),
                        "oldest_available": oldest_available.map(|id| id.to_string()),
                    }),
                ));
            }
            Resume::Resumed => {
                metrics::counter!("tollgate_stream_resumes_total", "outcome" => "ok").increment(1);
            }
            Resume::NotRequested => {}
        }
        opening.extend(
            replay
                .into_iter()
                .filter(|e| filter.wants(e))
                .map(Outgoing::Event),
        );
        let session = StreamSession {
            connection_id,
            filter,
            hub: hub.clone(),
            receiver,
            channel_capacity,
            last_seen: last_id,
        };
        (session, opening)
    }

    /// Waits for the next frame this connection wants.
    pub async fn next(&mut self) -> Result<Outgoing, SessionEnd> {
        loop {
            let received = self.receiver.recv().await;
            if let Some(out) = self.accept(received.map_err(Some))? {
                return Ok(out);
            }
        }
    }

    /// Whether the events waiting for this session fill under a quarter of
    /// its channel, so that it can wait a little before draining them
    /// without coming near a lag.
    pub fn backlog_is_small(&self) -> bool {
        self.receiver.len() < self.channel_capacity / 4
    }

    /// The next wanted frame if one is ready now, for draining a burst into
    /// one write.
    pub fn try_next(&mut self) -> Result<Option<Outgoing>, SessionEnd> {
        loop {
            let received = match self.receiver.try_recv() {
                Ok(event) => Ok(event),
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Closed) => Err(Some(RecvError::Closed)),
                Err(TryRecvError::Lagged(n)) => Err(Some(RecvError::Lagged(n))),
            };
            if let Some(out) = self.accept(received)? {
                return Ok(Some(out));
            }
        }
    }

    /// Turns one receive into a frame, `None` for an event filtered out.
    fn accept(
        &mut self,
        received: Result<Arc<StoredEvent>, Option<RecvError>>,
    ) -> Result<Option<Outgoing>, SessionEnd> {
        match received {
            Ok(event) => {
                self.last_seen = event.id;
                Ok(self.filter.wants(&event).then_some(Outgoing::Event(event)))
            }
            Err(Some(RecvError::Lagged(skipped))) => {
                let resume_from = self.last_seen;
                let filter = &self.filter;
                let missed = self
                    .hub
                    .count_missed(resume_from, skipped, &|e| filter.wants(e));
                self.last_seen += skipped;
                if missed == 0 {
                    return Ok(None);
                }
                metrics::counter!("tollgate_events_lagged_total").increment(missed);
                Ok(Some(control(
                    "lagged",
                    json!({ "missed": missed, "resume_from": resume_from.to_string() }),
                )))
            }
            Err(_) => Err(SessionEnd::HubClosed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::model::{SystemStartup, TopicSet, TypeSet};

    #[test]
    fn the_backlog_is_small_below_a_quarter_of_the_channel() {
        let hub = EventHub::local(16, 0);
        let filter = StreamFilter {
            identity: Identity::Anonymous,
            topics: TopicSet::all(),
            types: TypeSet::default(),
        };
        let (mut session, _) = StreamSession::open(&hub, filter, None);
        let publish = || {
            hub.publish(SystemStartup {
                version: "1".into(),
                node: "n".into(),
                listen: "x".into(),
            })
        };
        assert!(session.backlog_is_small());
        for _ in 0..3 {
            publish();
        }
        assert!(session.backlog_is_small(), "3 of 16 waiting");
        publish();
        assert!(!session.backlog_is_small(), "4 of 16 waiting");
        assert!(session.try_next().unwrap().is_some());
        assert!(session.backlog_is_small(), "3 of 16 waiting again");
    }
}
