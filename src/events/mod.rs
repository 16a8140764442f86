//! The live event stream: typed events ([`model`]), the hub that stamps,
//! serialises once, keeps and broadcasts them ([`hub`]), who may see what
//! ([`visibility`]), and the transports that deliver them.

pub mod admission;
pub mod credential;
pub mod hub;
pub mod model;
pub mod runtime;
pub mod session;
pub mod sse;
pub mod upgrade;
pub mod visibility;
pub mod ws;

pub use hub::{EventHub, StoredEvent, Subscription};
pub use model::{EventPayload, EventType, Topic};
