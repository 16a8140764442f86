//! The event hub: where producers publish and connections subscribe.
//!
//! Publishing stamps a strictly increasing id and a UTC timestamp,
//! serialises the envelope **once** into shared bytes, keeps it in a
//! history ring for resume, and broadcasts it on a bounded
//! `tokio::sync::broadcast` channel. It never waits for a subscriber: one
//! that falls more than `channel_capacity` events behind loses the oldest
//! and is told how many (the `Lagged` case).
//!
//! [`EventHub`] is a cheap handle over an [`EventBus`], the transport. The
//! in-process [`LocalBus`] is the one that exists; a bus backed by a shared
//! log (Redis Streams) can replace it without touching producers or
//! connections, which only see [`EventHub`], [`StoredEvent`] and
//! [`Subscription`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::model::{Audience, EventPayload, EventType, Topic};

/// A published event: its routing facts and its envelope, serialised once
/// and shared by every subscriber and the history.
#[derive(Debug)]
pub struct StoredEvent {
    pub id: u64,
    pub event_type: EventType,
    pub audience: Audience,
    /// The JSON envelope, ready to be a WebSocket text frame or SSE data.
    pub json: Utf8Bytes,
}

impl StoredEvent {
    pub fn topic(&self) -> Topic {
        self.event_type.topic()
    }
}

/// What happened to a `since` cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// No cursor was given: live events only.
    NotRequested,
    /// Every kept event after the cursor is in `replay`.
    Resumed,
    /// The cursor is older than the history (or unknown): live events only.
    Failed { oldest_available: Option<u64> },
}

/// A subscriber's start: the events to replay, then the live receiver,
/// taken together so that nothing falls between them.
pub struct Subscription {
    pub replay: Vec<Arc<StoredEvent>>,
    pub resume: Resume,
    pub receiver: broadcast::Receiver<Arc<StoredEvent>>,
    /// The id of the newest event published before the live part begins.
    pub last_id: u64,
    /// How many events `receiver` may fall behind before it lags.
    pub channel_capacity: usize,
}

/// The transport behind [`EventHub`].
pub trait EventBus: Send + Sync + 'static {
    /// Stamps, serialises once, keeps and broadcasts an event. Never blocks
    /// on subscribers.
    fn publish(&self, payload: &EventPayload) -> Arc<StoredEvent>;
    /// Subscribes, replaying the kept events after `since` first.
    fn subscribe(&self, since: Option<u64>) -> Subscription;
    /// How many of the `count` events after `after` satisfy `wanted`, where
    /// they are still kept; `count` itself where they are not.
    fn count_missed(&self, after: u64, count: u64, wanted: &dyn Fn(&StoredEvent) -> bool) -> u64;
    /// Applies new sizes (after a configuration reload): subscribers from
    /// now on get `channel_capacity`; existing ones keep theirs.
    fn resize(&self, channel_capacity: usize, history_size: usize);
    /// The fewest events any current subscriber may fall behind before it
    /// lags: what a producer publishing in bursts must keep its bursts under.
    fn smallest_channel_capacity(&self) -> usize;
}

/// The handle producers and connections hold.
#[derive(Clone)]
pub struct EventHub {
    bus: Arc<dyn EventBus>,
}

impl EventHub {
    pub fn new(bus: Arc<dyn EventBus>) -> EventHub {
        EventHub { bus }
    }

    /// An in-process hub: `channel_capacity` events per subscriber before it
    /// lags, `history_size` kept for resume.
    pub fn local(channel_capacity: usize, history_size: usize) -> EventHub {
        EventHub::new(Arc::new(LocalBus::new(channel_capacity, history_size)))
    }

    pub fn publish(&self, payload: impl Into<EventPayload>) -> Arc<StoredEvent> {
        let payload = payload.into();
        let event = self.bus.publish(&payload);
        metrics::counter!("tollgate_events_published_total", "type" => event.event_type.as_str())
            .increment(1);
        event
    }

    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        self.bus.subscribe(since)
    }

    pub fn count_missed(
        &self,
        after: u64,
        count: u64,
        wanted: &dyn Fn(&StoredEvent) -> bool,
    ) -> u64 {
        self.bus.count_missed(after, count, wanted)
    }

    pub fn resize(&self, channel_capacity: usize, history_size: usize) {
        self.bus.resize(channel_capacity, history_size)
    }

    pub fn smallest_channel_capacity(&self) -> usize {
        self.bus.smallest_channel_capacity()
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    id: String,
    #[serde(rename = "type")]
    event_type: EventType,
    topic: Topic,
    timestamp: String,
    payload: &'a EventPayload,
}

/// The in-process bus: a mutex-guarded id counter, history ring and
/// broadcast channel.
pub struct LocalBus {
    state: Mutex<LocalState>,
}

struct LocalState {
    last_id: u64,
    history: VecDeque<Arc<StoredEvent>>,
    history_size: usize,
    /// The channel new subscribers join, and its capacity.
    sender: broadcast::Sender<Arc<StoredEvent>>,
    channel_capacity: usize,
    /// Channels of an earlier capacity, kept while they have subscribers,
    /// with their capacities.
    retired: Vec<(broadcast::Sender<Arc<StoredEvent>>, usize)>,
}

impl LocalBus {
    pub fn new(channel_capacity: usize, history_size: usize) -> LocalBus {
        let channel_capacity = channel_capacity.max(1);
        // Ids continue from the start time in microseconds, so that ids
        // from before a restart are older than every new one and resume
        // with them fails cleanly instead of replaying the wrong events.
        let start = chrono::Utc::now().timestamp_micros().max(0) as u64;
        LocalBus {
            state: Mutex::new(LocalState {
                last_id: start,
                history: VecDeque::with_capacity(history_size),
                history_size,
                sender: broadcast::channel(channel_capacity).0,
                channel_capacity,
                retired: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        // A panic while holding the lock cannot leave the ring half-updated
        // in a way that matters more than losing the stream, so recover.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl EventBus for LocalBus {
    fn publish(&self, payload: &EventPayload) -> Arc<StoredEvent> {
        let event_type = payload.event_type();
        let mut state = self.lock();
        // Id, time, history and send happen under one lock so that ids are
        // strictly increasing in send order and a subscriber taking the
        // history and the receiver together sees no gap and no duplicate.
        let id = state.last_id + 1;
        let envelope = Envelope {
            id: id.to_string(),
            event_type,
            topic: event_type.topic(),
            timestamp: chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string(),
            payload,
        };
        let json = serde_json::to_string(&envelope).expect("event payloads always serialise");
        let event = Arc::new(StoredEvent {
            id,
            event_type,
            audience: payload.audience(),
            json: Utf8Bytes::from(json),
        });
        state.last_id = id;
        if state.history_size > 0 {
            if state.history.len() == state.history_size {
                state.history.pop_front();
            }
            state.history.push_back(event.clone());
        }
        // An error only means nobody is subscribed.
        let _ = state.sender.send(event.clone());
        if !state.retired.is_empty() {
            state
                .retired
                .retain(|(sender, _)| sender.send(event.clone()).is_ok());
        }
        event
    }

    fn subscribe(&self, since: Option<u64>) -> Subscription {
        let state = self.lock();
        let receiver = state.sender.subscribe();
        let last_id = state.last_id;
        let (replay, resume) = match since {
            None => (Vec::new(), Resume::NotRequested),
            Some(since) if since == last_id => (Vec::new(), Resume::Resumed),
            Some(since) => {
                let oldest = state.history.front().map(|e| e.id);
                match oldest {
                    Some(oldest) if since < last_id && since + 1 >= oldest => (
                        state
                            .history
                            .iter()
                            .filter(|e| e.id > since)
                            .cloned()
                            .collect(),
                        Resume::Resumed,
                    ),
                    _ => (
                        Vec::new(),
                        Resume::Failed {
                            oldest_available: oldest,
                        },
                    ),
                }
            }
        };
        Subscription {
            replay,
            resume,
            receiver,
            last_id,
            channel_capacity: state.channel_capacity,
        }
    }

    fn count_missed(&self, after: u64, count: u64, wanted: &dyn Fn(&StoredEvent) -> bool) -> u64 {
        let state = self.lock();
        let first_missed = after + 1;
        match state.history.front() {
            Some(oldest) if oldest.id <= first_missed => {
                let skip = (first_missed - oldest.id) as usize;
                state
                    .history
                    .iter()
                    .skip(skip)
                    .take(count as usize)
                    .filter(|e| wanted(e))
                    .count() as u64
            }
            _ => count,
        }
    }

    fn resize(&self, channel_capacity: usize, history_size: usize) {
        let mut state = self.lock();
        let channel_capacity = channel_capacity.max(1);
        if channel_capacity != state.channel_capacity {
            let old = std::mem::replace(&mut state.sender, broadcast::channel(channel_capacity).0);
            let old_capacity = std::mem::replace(&mut state.channel_capacity, channel_capacity);
            if old.receiver_count() > 0 {
                state.retired.push((old, old_capacity));
            }
        }
        state.history_size = history_size;
        while state.history.len() > history_size {
            state.history.pop_front();
        }
    }

    fn smallest_channel_capacity(&self) -> usize {
        let mut state = self.lock();
        // A retired channel whose last subscriber left no longer counts.
        state
            .retired
            .retain(|(sender, _)| sender.receiver_count() > 0);
        state
            .retired
            .iter()
            .map(|(_, capacity)| *capacity)
            .fold(state.channel_capacity, usize::min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::model::{ConfigReloaded, SystemStartup};

    fn startup(n: usize) -> EventPayload {
        EventPayload::SystemStartup(SystemStartup {
            version: "1".into(),
            node: format!("n{n}"),
            listen: "x".into(),
        })
    }

    #[test]
    fn publish_stamps_increasing_ids_and_a_millisecond_utc_timestamp() {
        let hub = EventHub::local(8, 8);
        let a = hub.publish(startup(1));
        let b = hub.publish(startup(2));
        assert_eq!(b.id, a.id + 1);
        let value: serde_json::Value = serde_json::from_str(&b.json).unwrap();
        assert_eq!(value["id"], b.id.to_string());
        assert_eq!(value["type"], "system.startup");
        assert_eq!(value["topic"], "system");
        assert_eq!(value["payload"]["node"], "n2");
        let ts = value["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-27T17:00:00.123Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
        chrono::DateTime::parse_from_rfc3339(ts).unwrap();
    }

    #[test]
    fn resume_replays_exactly_the_kept_events_after_the_cursor() {
        let hub = EventHub::local(8, 4);
        let ids: Vec<u64> = (0..6).map(|n| hub.publish(startup(n)).id).collect();
        // Kept: ids[2..6]. Resuming from ids[1] needs ids[2..] — all kept.
        let sub = hub.subscribe(Some(ids[1]));
        assert_eq!(sub.resume, Resume::Resumed);
        assert_eq!(
            sub.replay.iter().map(|e| e.id).collect::<Vec<_>>(),
            ids[2..]
        );
        // From the newest: nothing to replay, still resumed.
        let sub = hub.subscribe(Some(ids[5]));
        assert_eq!(sub.resume, Resume::Resumed);
        assert!(sub.replay.is_empty());
        // ids[1] is gone, so resuming from ids[0] would leave a gap.
        let sub = hub.subscribe(Some(ids[0]));
        assert_eq!(
            sub.resume,
            Resume::Failed {
                oldest_available: Some(ids[2])
            }
        );
        assert!(sub.replay.is_empty());
        // An id from the future is unknown.
        let sub = hub.subscribe(Some(ids[5] + 10));
        assert_eq!(
            sub.resume,
            Resume::Failed {
                oldest_available: Some(ids[2])
            }
        );
    }

    #[test]
    fn with_no_history_only_the_newest_id_resumes() {
        let hub = EventHub::local(8, 0);
        let a = hub.publish(startup(0));
        let b = hub.publish(startup(1));
        assert_eq!(hub.subscribe(Some(b.id)).resume, Resume::Resumed);
        assert_eq!(
            hub.subscribe(Some(a.id)).resume,
            Resume::Failed {
                oldest_available: None
            }
        );
    }

    #[tokio::test]
    async fn live_events_follow_the_replay_without_gap_or_duplicate() {
        let hub = EventHub::local(64, 64);
        let first = hub.publish(startup(0));
        let mut sub = hub.subscribe(Some(first.id - 1));
        let next = hub.publish(startup(1));
        assert_eq!(
            sub.replay.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![first.id]
        );
        assert_eq!(sub.receiver.recv().await.unwrap().id, next.id);
        assert_eq!(sub.last_id, first.id);
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_by_the_exact_count_and_publishing_never_blocks() {
        let hub = EventHub::local(4, 64);
        let mut sub = hub.subscribe(None);
        let ids: Vec<u64> = (0..10).map(|n| hub.publish(startup(n)).id).collect();
        match sub.receiver.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 6),
            other => panic!("expected a lag, got {other:?}"),
        }
        assert_eq!(sub.receiver.recv().await.unwrap().id, ids[6]);
        // Of the six missed, count those a filtered subscriber wanted.
        let even = |e: &StoredEvent| e.id.is_multiple_of(2);
        let expected = ids[..6].iter().filter(|id| id.is_multiple_of(2)).count() as u64;
        assert_eq!(hub.count_missed(sub.last_id, 6, &even), expected);
    }

    #[tokio::test]
    async fn resizing_applies_to_new_subscribers_and_keeps_existing_ones_fed() {
        let hub = EventHub::local(2, 8);
        let mut old = hub.subscribe(None);
        hub.resize(16, 3);
        let mut new = hub.subscribe(None);
        let ids: Vec<u64> = (0..5).map(|n| hub.publish(startup(n)).id).collect();
        // The old subscriber keeps its capacity of 2 and lags by 3.
        assert!(matches!(
            old.receiver.recv().await,
            Err(broadcast::error::RecvError::Lagged(3))
        ));
        assert_eq!(old.receiver.recv().await.unwrap().id, ids[3]);
        // The new one has room for all five.
        for id in &ids {
            assert_eq!(new.receiver.recv().await.unwrap().id, *id);
        }
        // History shrank to 3.
        let sub = hub.subscribe(Some(ids[0]));
        assert_eq!(
            sub.resume,
            Resume::Failed {
                oldest_available: Some(ids[2])
            }
        );
    }

    #[test]
    fn the_smallest_channel_capacity_counts_retired_channels_while_they_have_subscribers() {
        let hub = EventHub::local(64, 8);
        assert_eq!(hub.smallest_channel_capacity(), 64);
        let old = hub.subscribe(None);
        hub.resize(1024, 8);
        assert_eq!(hub.smallest_channel_capacity(), 64);
        hub.resize(256, 8);
        assert_eq!(hub.smallest_channel_capacity(), 64);
        drop(old);
        assert_eq!(hub.smallest_channel_capacity(), 256);
        hub.resize(0, 8);
        assert_eq!(hub.smallest_channel_capacity(), 1);
    }

    #[test]
    fn serialises_each_event_once_into_shared_bytes() {
        let hub = EventHub::local(8, 8);
        let mut sub = hub.subscribe(None);
        let published = hub.publish(EventPayload::SystemConfigReloaded(ConfigReloaded {
            changed_sections: vec!["server".into()],
        }));
        let received = sub.receiver.try_recv().unwrap();
        assert!(Arc::ptr_eq(&published, &received));
        let kept = hub.subscribe(Some(published.id - 1)).replay;
        assert!(Arc::ptr_eq(&published, &kept[0]));
    }
}
