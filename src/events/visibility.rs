//! Who may see which event: the one function that decides it, and the
//! per-connection filter (visibility, topics, types) built on it.

use crate::auth::Identity;

use super::hub::StoredEvent;
use super::model::{Audience, TopicSet, TypeSet};

/// Whether a connection with `identity` may see an event for `audience`.
///
/// - anonymous connections (only possible with `require_auth = false`) and
///   admin keys see everything;
/// - other keys see ownerless events and the events of their own key;
/// - signed-in users in an admin group see everything, other users see
///   ownerless events and the events of the keys they own.
pub fn may_see(identity: &Identity, audience: Audience) -> bool {
    match identity {
        Identity::Anonymous => true,
        Identity::Key(key) if key.admin => true,
        Identity::User(user) if user.admin => true,
        Identity::Key(key) => match audience {
            Audience::Everyone => true,
            Audience::Key(owner) => owner == key.id,
            Audience::Admins => false,
        },
        Identity::User(user) => match audience {
            Audience::Everyone => true,
            Audience::Key(id) => user.owned_keys.contains(id),
            Audience::Admins => false,
        },
    }
}

/// What one connection receives: what it may see, narrowed to the topics it
/// subscribed to and the types it asked for.
#[derive(Debug, Clone)]
pub struct StreamFilter {
    pub identity: Identity,
    pub topics: TopicSet,
    pub types: TypeSet,
}

impl StreamFilter {
    pub fn wants(&self, event: &StoredEvent) -> bool {
        self.topics.contains(event.topic())
            && self.types.contains_or_empty(event.event_type)
            && may_see(&self.identity, event.audience)
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::auth::session::{OwnedKeys, UserIdentity};
    use crate::auth::KeyIdentity;

    fn key(admin: bool) -> (Uuid, Identity) {
        let id = Uuid::new_v4();
        let identity = Identity::Key(KeyIdentity {
            id,
            name: "k".into(),
            admin,
        });
        (id, identity)
    }

    #[test]
    fn a_key_sees_ownerless_events_and_its_own_but_not_another_keys() {
        let (own, identity) = key(false);
        assert!(may_see(&identity, Audience::Everyone));
        assert!(may_see(&identity, Audience::Key(own)));
        assert!(!may_see(&identity, Audience::Key(Uuid::new_v4())));
        assert!(!may_see(&identity, Audience::Admins));
    }

    fn user(admin: bool, owned: &[Uuid]) -> Identity {
        Identity::User(UserIdentity {
            subject: "alice".into(),
            name: None,
            admin,
            session_hash: "h".into(),
            owned_keys: OwnedKeys::new(owned.iter().copied()),
        })
    }

    #[test]
    fn a_user_sees_ownerless_events_and_those_of_keys_they_own() {
        let (mine, other) = (Uuid::new_v4(), Uuid::new_v4());
        let identity = user(false, &[mine]);
        assert!(may_see(&identity, Audience::Everyone));
        assert!(may_see(&identity, Audience::Key(mine)));
        assert!(!may_see(&identity, Audience::Key(other)));
        assert!(!may_see(&identity, Audience::Admins));
    }

    #[test]
    fn a_users_owned_keys_can_change_while_connected() {
        let later = Uuid::new_v4();
        let identity = user(false, &[]);
        assert!(!may_see(&identity, Audience::Key(later)));
        let Identity::User(u) = &identity else {
            unreachable!()
        };
        u.owned_keys.replace([later]);
        assert!(may_see(&identity, Audience::Key(later)));
    }

    #[test]
    fn admins_and_anonymous_connections_see_everything() {
        let (_, admin) = key(true);
        for identity in [admin, user(true, &[]), Identity::Anonymous] {
            for audience in [
                Audience::Everyone,
                Audience::Key(Uuid::new_v4()),
                Audience::Admins,
            ] {
                assert!(may_see(&identity, audience), "{identity:?} {audience:?}");
            }
        }
    }
}
