//! API key material: generating a key, hashing it for storage, and
//! checking a presented key against a stored hash in constant time.
//!
//! A key is `gw_live_` followed by 32 random bytes in unpadded base64url
//! (43 characters). Only its SHA-256 is stored, with a short prefix so that
//! operators can tell keys apart in listings.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "gw_live_";
const RANDOM_BYTES: usize = 32;
/// Length of the base64url text of the random part.
const RANDOM_CHARS: usize = 43;
/// Characters of the key kept for display: the fixed prefix plus six.
const DISPLAY_PREFIX_LEN: usize = KEY_PREFIX.len() + 6;

/// A full API key. Its `Debug` form is redacted so it cannot reach a log by
/// accident; use [`ApiKeySecret::expose`] where the key must be shown once.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeySecret(String);

impl ApiKeySecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeySecret({}…)", display_prefix(&self.0))
    }
}

/// A newly generated key with what the store keeps of it.
#[derive(Debug, Clone)]
pub struct GeneratedKey {
    pub secret: ApiKeySecret,
    pub hash: String,
    pub prefix: String,
}

pub fn generate() -> GeneratedKey {
    let mut bytes = [0u8; RANDOM_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    GeneratedKey {
        hash: hash(&secret),
        prefix: display_prefix(&secret).to_owned(),
        secret: ApiKeySecret(secret),
    }
}

/// The stored form of a key: lowercase hex SHA-256.
pub fn hash(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Whether `text` has the shape of a key: the prefix and 43 base64url
/// characters. Anything else is refused without touching the store.
pub fn is_well_formed(text: &str) -> bool {
    text.strip_prefix(KEY_PREFIX).is_some_and(|random| {
        random.len() == RANDOM_CHARS
            && random
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Whether `key` hashes to `stored_hash`, compared in constant time.
pub fn verify(key: &str, stored_hash: &str) -> bool {
    hash(key).as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

fn display_prefix(key: &str) -> &str {
    key.get(..DISPLAY_PREFIX_LEN).unwrap_or(KEY_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_the_prefix_and_43_base64url_characters() {
        let key = generate();
        let text = key.secret.expose();
        assert!(text.starts_with("gw_live_"), "{text}");
        assert_eq!(text.len(), 8 + 43);
        assert!(text[8..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert!(!text.contains('='));
        assert!(is_well_formed(text));
        assert_eq!(URL_SAFE_NO_PAD.decode(&text[8..]).unwrap().len(), 32);
    }

    #[test]
    fn two_keys_differ() {
        let (a, b) = (generate(), generate());
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.hash, b.hash);
    }

    #[test]
    fn the_stored_hash_accepts_the_key_and_rejects_a_one_character_change() {
        let key = generate();
        let text = key.secret.expose();
        assert!(verify(text, &key.hash));
        let mut changed = text.to_owned().into_bytes();
        let last = changed.len() - 1;
        changed[last] = if changed[last] == b'A' { b'B' } else { b'A' };
        let changed = String::from_utf8(changed).unwrap();
        assert!(!verify(&changed, &key.hash));
        assert_eq!(key.hash.len(), 64);
        assert!(!key.hash.contains(&text[8..]));
    }

    #[test]
    fn the_display_prefix_is_short_and_debug_never_shows_the_key() {
        let key = generate();
        assert_eq!(key.prefix.len(), 14);
        assert!(key.secret.expose().starts_with(&key.prefix));
        let debug = format!("{:?}", key.secret);
        assert!(!debug.contains(&key.secret.expose()[14..]), "{debug}");
    }

    #[test]
    fn malformed_keys_are_recognised() {
        for text in [
            "",
            "gw_live_",
            "gw_test_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "gw_live_short",
            "gw_live_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!",
        ] {
            assert!(!is_well_formed(text), "{text}");
        }
    }
}
