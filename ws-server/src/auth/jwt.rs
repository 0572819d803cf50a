//! Users' bearer tokens: HS256 JWTs, an access token good for
//! [`ACCESS_LIFETIME`] and a refresh token good for [`REFRESH_LIFETIME`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{AccessError, Role};
use crate::ServerError;

/// How long an access token is good for.
pub const ACCESS_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// How long a refresh token is good for: a working day, so a dashboard
/// left open keeps going without the password.
pub const REFRESH_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// The shortest signing key accepted: HS256's own size.
const MIN_SECRET: usize = 32;

/// What a token is for: a refresh token is refused where an access token is
/// needed, and the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Kind {
    Access,
    Refresh,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Claims {
    /// The user's name.
    pub sub: String,
    /// The role when the token was issued (the users file's role counts).
    pub role: Role,
    pub typ: Kind,
    pub iat: u64,
    pub exp: u64,
}

pub(crate) struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub fn new(secret: &[u8]) -> Result<Keys, AccessError> {
        if secret.len() < MIN_SECRET {
            return Err(AccessError::WeakSecret {
                min: MIN_SECRET,
                got: secret.len(),
            });
        }
        let key_error = |e: jsonwebtoken::errors::Error| AccessError::Key(e.to_string());
        Ok(Keys {
            encoding: EncodingKey::from_secret(secret).map_err(key_error)?,
            decoding: DecodingKey::from_secret(secret).map_err(key_error)?,
        })
    }

    /// A signed token of `kind` for `name`.
    pub fn issue(&self, name: &str, role: Role, kind: Kind) -> Result<String, ServerError> {
        let now = unix_now();
        let lifetime = match kind {
            Kind::Access => ACCESS_LIFETIME,
            Kind::Refresh => REFRESH_LIFETIME,
        };
        let claims = Claims {
            sub: name.to_string(),
            role,
            typ: kind,
            iat: now,
            exp: now + lifetime.as_secs(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| ServerError::Internal(format!("cannot sign a token: {e}")))
    }

    /// The claims of a valid, unexpired token of `kind`.
    pub fn verify(&self, token: &str, kind: Kind) -> Result<Claims, ServerError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is exact: a token is refused the second it expires.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| ServerError::Unauthorized(format!("invalid token: {e}")))?;
        if data.claims.typ != kind {
            return Err(ServerError::Unauthorized(format!(
                "a {:?} token cannot be used here",
                data.claims.typ
            )));
        }
        Ok(data.claims)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_key_and_kind() {
        let keys = Keys::new(&[7u8; 32]).unwrap();
        let access = keys.issue("alice", Role::Analyst, Kind::Access).unwrap();
        let claims = keys.verify(&access, Kind::Access).unwrap();
        assert_eq!((claims.sub.as_str(), claims.role), ("alice", Role::Analyst));
        assert_eq!(claims.exp - claims.iat, ACCESS_LIFETIME.as_secs());
        assert!(keys.verify(&access, Kind::Refresh).is_err());
        let other = Keys::new(&[8u8; 32]).unwrap();
        assert!(other.verify(&access, Kind::Access).is_err());
        let mut tampered = access.clone();
        tampered.insert(tampered.len() - 2, 'A');
        assert!(keys.verify(&tampered, Kind::Access).is_err());
        assert!(Keys::new(b"short").is_err());
    }
}
