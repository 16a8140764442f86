//! The store's test suite, run against SQLite always and against PostgreSQL
//! when `TOLLGATE_TEST_POSTGRES_URL` is set. Each test is written once, as
//! `async fn name(db: &TestDb)`, and [`on_both_backends!`] generates
//! `sqlite::name` and `postgres::name`, each on a database of its own.

mod support;

use chrono::{DateTime, Duration, Utc};
use support::{wait_until, TestDb, DEADLINE};
use tollgate::auth::keys::{self, GeneratedKey};
use tollgate::store::{
    ApiKeyRecord, AuditQuery, Backend, LedgerRow, NewApiKey, NewAuditRecord, SessionRecord, Store,
    StoreError, UsageQuery,
};
use uuid::Uuid;

macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let db = crate::support::TestDb::sqlite();
                    super::$test(&db).await;
                    db.cleanup().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let Some(db) = crate::support::TestDb::postgres().await else {
                        return;
                    };
                    super::$test(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

on_both_backends!(
    a_batch_of_requests_lands_whole_and_in_order,
    sessions_round_trip_end_once_and_are_purged,
    keys_have_owners_and_are_found_by_them,
    the_store_uses_the_backend_its_url_names,
    keys_are_found_by_hash_and_listed_oldest_first,
    a_key_hash_is_stored_only_once,
    revoking_sets_revoked_at_and_a_second_revoke_keeps_the_first_time,
    keys_are_found_by_id_or_by_a_unique_prefix,
    an_ambiguous_prefix_is_an_error_not_a_guess,
    a_prefix_matches_its_characters_exactly,
    an_empty_or_very_short_needle_names_no_key,
    touching_a_key_sets_last_used_at,
    expires_at_round_trips_at_millisecond_precision,
    migrations_run_again_on_a_migrated_database_without_error,
);

fn new_key(name: &str, admin: bool, generated: &GeneratedKey) -> NewApiKey {
    NewApiKey {
        name: name.to_owned(),
        prefix: generated.prefix.clone(),
        key_hash: generated.hash.clone(),
        admin,
        expires_at: None,
        budget: None,
        owner: None,
    }
}

/// Stores a key with a chosen display prefix.
async fn insert_with_prefix(store: &Store, prefix: &str) -> ApiKeyRecord {
    let generated = keys::generate();
    store
        .insert_api_key(NewApiKey {
            prefix: prefix.to_owned(),
            ..new_key(prefix, false, &generated)
        })
        .await
        .expect("insert a key")
}

/// Waits until the clock has passed `t` at the store's millisecond
/// precision, so that the next time written differs from `t`.
async fn wait_past_millisecond(t: DateTime<Utc>) {
    let ms = t.timestamp_millis();
    wait_until("the clock passes a stored time", DEADLINE, || async move {
        Utc::now().timestamp_millis() > ms
    })
    .await;
}

async fn the_store_uses_the_backend_its_url_names(db: &TestDb) {
    let expected = if db.url.starts_with("sqlite:") {
        Backend::Sqlite
    } else {
        Backend::Postgres
    };
    assert_eq!(db.store().await.backend(), expected);
}

async fn keys_are_found_by_hash_and_listed_oldest_first(db: &TestDb) {
    let store = db.store().await;
    assert_eq!(store.count_api_keys().await.unwrap(), 0);
    assert!(store.list_api_keys().await.unwrap().is_empty());

    let mut inserted = Vec::new();
    for (name, admin) in [("first", true), ("second", false), ("third", false)] {
        let generated = keys::generate();
        let before = Utc::now().timestamp_millis();
        let record = store
            .insert_api_key(new_key(name, admin, &generated))
            .await
            .unwrap();
        assert_eq!(record.name, name);
        assert_eq!(record.prefix, generated.prefix);
        assert_eq!(record.key_hash, generated.hash);
        assert_eq!(record.admin, admin);
        assert!(record.created_at.timestamp_millis() >= before);
        assert!(record.created_at <= Utc::now());
        assert_eq!(
            (record.expires_at, record.revoked_at, record.last_used_at),
            (None, None, None)
        );
        wait_past_millisecond(record.created_at).await;
        inserted.push((record, generated));
    }

    for (record, generated) in &inserted {
        let by_hash = store.find_api_key_by_hash(&generated.hash).await.unwrap();
        assert_eq!(by_hash.as_ref(), Some(record));
        let by_id = store.find_api_key(record.id).await.unwrap();
        assert_eq!(by_id.as_ref(), Some(record));
    }
    let unknown = keys::generate();
    assert_eq!(
        store.find_api_key_by_hash(&unknown.hash).await.unwrap(),
        None
    );
    assert_eq!(store.find_api_key(Uuid::new_v4()).await.unwrap(), None);

    let listed = store.list_api_keys().await.unwrap();
    let names: Vec<&str> = listed.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["first", "second", "third"]);
    let records: Vec<ApiKeyRecord> = inserted.into_iter().map(|(r, _)| r).collect();
    assert_eq!(listed, records);
    assert_eq!(store.count_api_keys().await.unwrap(), 3);
}

async fn a_key_hash_is_stored_only_once(db: &TestDb) {
    let store = db.store().await;
    let generated = keys::generate();
    store
        .insert_api_key(new_key("one", false, &generated))
        .await
        .unwrap();
    let again = store
        .insert_api_key(new_key("two", false, &generated))
        .await;
    assert!(matches!(again, Err(StoreError::Database(_))), "{again:?}");
    assert_eq!(store.count_api_keys().await.unwrap(), 1);
}

async fn revoking_sets_revoked_at_and_a_second_revoke_keeps_the_first_time(db: &TestDb) {
    let store = db.store().await;
    let target = insert_with_prefix(&store, "gw_live_target").await;
    let bystander = insert_with_prefix(&store, "gw_live_bystnd").await;

    let before = Utc::now().timestamp_millis();
    let revoked = store.revoke_api_key(target.id).await.unwrap();
    let first = revoked.revoked_at.expect("revoke sets revoked_at");
    assert!(first.timestamp_millis() >= before);
    assert!(first <= Utc::now());
    assert!(revoked.is_revoked());
    assert_eq!(
        ApiKeyRecord {
            revoked_at: None,
            ..revoked
        },
        target,
        "revoking changes nothing but revoked_at"
    );

    wait_past_millisecond(first).await;
    let again = store.revoke_api_key(target.id).await.unwrap();
    assert_eq!(again.revoked_at, Some(first));
    let stored = store.find_api_key(target.id).await.unwrap().unwrap();
    assert_eq!(stored.revoked_at, Some(first));

    let untouched = store.find_api_key(bystander.id).await.unwrap().unwrap();
    assert_eq!(untouched.revoked_at, None);

    let missing = store.revoke_api_key(Uuid::new_v4()).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

async fn keys_are_found_by_id_or_by_a_unique_prefix(db: &TestDb) {
    let store = db.store().await;
    let alpha = insert_with_prefix(&store, "gw_live_alpha1").await;
    let beta = insert_with_prefix(&store, "gw_live_beta22").await;

    let by_id = store
        .find_api_key_by_id_or_prefix(&alpha.id.to_string())
        .await
        .unwrap();
    assert_eq!(by_id, alpha);
    for needle in ["gw_live_beta22", "gw_live_b", "gw_live_beta"] {
        let found = store.find_api_key_by_id_or_prefix(needle).await.unwrap();
        assert_eq!(found, beta, "needle {needle}");
    }
    for needle in ["gw_live_gamma", "gw_live_beta223", "beta22"] {
        let missing = store.find_api_key_by_id_or_prefix(needle).await;
        assert!(
            matches!(missing, Err(StoreError::NotFound(_))),
            "needle {needle}: {missing:?}"
        );
    }
    let unknown_id = store
        .find_api_key_by_id_or_prefix(&Uuid::new_v4().to_string())
        .await;
    assert!(
        matches!(unknown_id, Err(StoreError::NotFound(_))),
        "{unknown_id:?}"
    );
}

async fn an_ambiguous_prefix_is_an_error_not_a_guess(db: &TestDb) {
    let store = db.store().await;
    let one = insert_with_prefix(&store, "gw_live_same01").await;
    let two = insert_with_prefix(&store, "gw_live_same02").await;

    for needle in ["gw_live_same", "gw_live_same0", "gw_live_"] {
        let found = store.find_api_key_by_id_or_prefix(needle).await;
        match found {
            Err(StoreError::Ambiguous(message)) => {
                assert!(message.contains("2 API keys"), "{message}")
            }
            other => panic!("needle {needle}: expected Ambiguous, got {other:?}"),
        }
    }
    assert_eq!(
        store
            .find_api_key_by_id_or_prefix("gw_live_same01")
            .await
            .unwrap(),
        one
    );
    assert_eq!(
        store
            .find_api_key_by_id_or_prefix("gw_live_same02")
            .await
            .unwrap(),
        two
    );
}

async fn a_prefix_matches_its_characters_exactly(db: &TestDb) {
    // `_` is a base64url character, so it occurs in real prefixes; SQL LIKE
    // would match any character with it, and ignore case on SQLite.
    let store = db.store().await;
    let underscores = insert_with_prefix(&store, "gw_live_a_b_c1").await;
    insert_with_prefix(&store, "gw_live_aXbYc2").await;
    let upper = insert_with_prefix(&store, "gw_live_Case01").await;

    let found = store
        .find_api_key_by_id_or_prefix("gw_live_a_b")
        .await
        .unwrap();
    assert_eq!(found, underscores);
    let found = store
        .find_api_key_by_id_or_prefix("gw_live_Case")
        .await
        .unwrap();
    assert_eq!(found, upper);
    for needle in ["gw_live_%", "gw_live_case01", "gw_live_A"] {
        let missing = store.find_api_key_by_id_or_prefix(needle).await;
        assert!(
            matches!(missing, Err(StoreError::NotFound(_))),
            "needle {needle}: {missing:?}"
        );
    }
}

async fn touching_a_key_sets_last_used_at(db: &TestDb) {
    let store = db.store().await;
    let key = insert_with_prefix(&store, "gw_live_touch1").await;
    assert_eq!(key.last_used_at, None);

    let at = Utc::now() - Duration::minutes(5);
    store.touch_api_key(key.id, at).await.unwrap();
    let touched = store.find_api_key(key.id).await.unwrap().unwrap();
    assert_eq!(
        touched.last_used_at.map(|t| t.timestamp_millis()),
        Some(at.timestamp_millis())
    );

    let later = at + Duration::minutes(2);
    store.touch_api_key(key.id, later).await.unwrap();
    let touched = store.find_api_key(key.id).await.unwrap().unwrap();
    assert_eq!(
        touched.last_used_at.map(|t| t.timestamp_millis()),
        Some(later.timestamp_millis())
    );
    assert_eq!(touched.revoked_at, None);
}

async fn expires_at_round_trips_at_millisecond_precision(db: &TestDb) {
    let store = db.store().await;
    // Nanoseconds included, to show the store keeps milliseconds.
    let expires = Utc::now() + Duration::days(30) + Duration::nanoseconds(123_456);
    let generated = keys::generate();
    let record = store
        .insert_api_key(NewApiKey {
            expires_at: Some(expires),
            ..new_key("expiring", false, &generated)
        })
        .await
        .unwrap();
    let stored = record.expires_at.expect("expires_at is kept");
    assert_eq!(stored.timestamp_millis(), expires.timestamp_millis());
    assert_eq!(
        store.find_api_key(record.id).await.unwrap().as_ref(),
        Some(&record)
    );
    assert!(!record.is_expired(Utc::now()));
    assert!(record.is_expired(expires + Duration::seconds(1)));

    let past = Utc::now() - Duration::seconds(1);
    let generated = keys::generate();
    let expired = store
        .insert_api_key(NewApiKey {
            expires_at: Some(past),
            ..new_key("expired", false, &generated)
        })
        .await
        .unwrap();
    let found = store
        .find_api_key_by_hash(&generated.hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found, expired);
    assert!(found.is_expired(Utc::now()));
}

async fn migrations_run_again_on_a_migrated_database_without_error(db: &TestDb) {
    let first = db.store().await;
    let key = insert_with_prefix(&first, "gw_live_kept01").await;

    // A second connection while the first is open, then one after it closed:
    // each runs the migrations again and sees the same data.
    let second = db.store().await;
    assert_eq!(second.count_api_keys().await.unwrap(), 1);
    first.close().await;
    second.close().await;
    let third = db.store().await;
    assert_eq!(third.find_api_key(key.id).await.unwrap(), Some(key));
    assert_eq!(third.count_api_keys().await.unwrap(), 1);
}

async fn an_empty_or_very_short_needle_names_no_key(db: &TestDb) {
    let store = db.store().await;
    insert_with_prefix(&store, "gw_live_only01").await;
    for needle in ["", "  ", "gw_"] {
        match store.find_api_key_by_id_or_prefix(needle).await {
            Err(StoreError::NotFound(message)) => {
                assert!(message.contains("too short"), "{message}")
            }
            other => panic!("needle {needle:?}: expected NotFound, got {other:?}"),
        }
    }
}

async fn sessions_round_trip_end_once_and_are_purged(db: &TestDb) {
    let store = db.store().await;
    // The store keeps milliseconds.
    let now = DateTime::from_timestamp_millis(Utc::now().timestamp_millis()).unwrap();
    let session = SessionRecord {
        id_hash: keys::hash("session-id"),
        subject: "alice".into(),
        name: Some("Alice".into()),
        email: None,
        admin: true,
        groups: vec!["ops".into(), "dev".into()],
        created_at: now,
        expires_at: now + Duration::hours(1),
        ended_at: None,
    };
    store.insert_session(&session).await.unwrap();
    assert_eq!(
        store.find_session(&session.id_hash).await.unwrap(),
        Some(session.clone())
    );
    assert_eq!(store.find_session("other").await.unwrap(), None);
    assert!(
        store.insert_session(&session).await.is_err(),
        "ids are unique"
    );

    let ended_at = now + Duration::minutes(5);
    store.end_session(&session.id_hash, ended_at).await.unwrap();
    store
        .end_session(&session.id_hash, ended_at + Duration::minutes(1))
        .await
        .unwrap();
    let ended = store.find_session(&session.id_hash).await.unwrap().unwrap();
    assert_eq!(ended.ended_at, Some(ended_at), "the first end is kept");

    let live = SessionRecord {
        id_hash: keys::hash("live"),
        ended_at: None,
        ..session.clone()
    };
    store.insert_session(&live).await.unwrap();
    assert_eq!(
        store.purge_sessions(now).await.unwrap(),
        0,
        "nothing ended before `now`"
    );
    assert_eq!(
        store
            .purge_sessions(now + Duration::minutes(10))
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.find_session(&session.id_hash).await.unwrap(), None);
    assert!(store.find_session(&live.id_hash).await.unwrap().is_some());
}

async fn keys_have_owners_and_are_found_by_them(db: &TestDb) {
    let store = db.store().await;
    let generated = keys::generate();
    let owned = store
        .insert_api_key(NewApiKey {
            owner: Some("alice".into()),
            ..new_key("owned", false, &generated)
        })
        .await
        .unwrap();
    assert_eq!(owned.owner.as_deref(), Some("alice"));
    let other = insert_with_prefix(&store, "gw_live_other").await;
    assert_eq!(
        store.key_ids_owned_by("alice").await.unwrap(),
        vec![owned.id]
    );
    let moved = store
        .set_api_key_owner(other.id, Some("alice"))
        .await
        .unwrap();
    assert_eq!(moved.owner.as_deref(), Some("alice"));
    let mut ids = store.key_ids_owned_by("alice").await.unwrap();
    ids.sort();
    let mut expected = vec![owned.id, other.id];
    expected.sort();
    assert_eq!(ids, expected);
    store.set_api_key_owner(owned.id, None).await.unwrap();
    assert_eq!(
        store.key_ids_owned_by("alice").await.unwrap(),
        vec![other.id]
    );
    assert!(matches!(
        store.set_api_key_owner(Uuid::new_v4(), Some("x")).await,
        Err(StoreError::NotFound(_))
    ));
}

/// More rows than one INSERT statement carries, with every column of each
/// row distinct, so a parameter bound to the wrong row or column shows.
async fn a_batch_of_requests_lands_whole_and_in_order(db: &TestDb) {
    let store = db.store().await;
    let key = Uuid::new_v4();
    let at = Utc::now();
    let n = 450i64;
    let ledger: Vec<LedgerRow> = (0..n)
        .map(|i| LedgerRow {
            at: at + Duration::milliseconds(i),
            request_id: format!("req-{i}"),
            key_id: key,
            model: format!("model-{}", i % 3),
            provider: "p".into(),
            input_tokens: i,
            output_tokens: 2 * i,
            cost_micros: 3 * i,
            latency_ms: 4 * i,
            status: 200 + i % 2,
            streamed: i % 2 == 0,
            estimated: i % 3 == 0,
        })
        .collect();
    let audit: Vec<NewAuditRecord> = (0..n)
        .map(|i| NewAuditRecord {
            at: at + Duration::milliseconds(i),
            event_type: "audit.request",
            key_id: (i % 2 == 0).then_some(key),
            request_id: Some(format!("req-{i}")),
            payload: format!(r#"{{"n":{i}}}"#),
        })
        .collect();
    store.record_requests(&ledger, &audit, &[]).await.unwrap();

    for i in [0, 1, 199, 200, 201, 449] {
        let rows = store
            .ledger_rows_for_request(&format!("req-{i}"))
            .await
            .unwrap();
        assert_eq!(rows.len(), 1, "req-{i}");
        let mut expected = ledger[i as usize].clone();
        // Stored at millisecond precision.
        expected.at = rows[0].at;
        assert_eq!(rows[0], expected, "req-{i}");
        assert_eq!(
            rows[0].at.timestamp_millis(),
            ledger[i as usize].at.timestamp_millis()
        );
    }
    let totals = store
        .usage_totals(&UsageQuery {
            key_id: Some(key),
            model: None,
            from: None,
            to: None,
            group_by: None,
        })
        .await
        .unwrap();
    assert_eq!(totals[0].requests, n);
    assert_eq!(totals[0].input_tokens, n * (n - 1) / 2);
    assert_eq!(totals[0].cost_micros, 3 * n * (n - 1) / 2);

    // The audit log keeps the batch's order: newest (last) first.
    let page = store
        .list_audit(&AuditQuery {
            since: None,
            event_type: None,
            key_id: None,
            before_id: None,
            limit: 1000,
        })
        .await
        .unwrap();
    assert_eq!(page.len(), n as usize);
    for (k, record) in page.iter().enumerate() {
        let i = n - 1 - k as i64;
        assert_eq!(
            record.request_id.as_deref(),
            Some(format!("req-{i}").as_str())
        );
        assert_eq!(record.payload["n"], i);
        assert_eq!(record.key_id, (i % 2 == 0).then_some(key));
        assert_eq!(
            record.at.timestamp_millis(),
            audit[i as usize].at.timestamp_millis()
        );
    }
}
