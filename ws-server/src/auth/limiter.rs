//! Failed logins are limited per name and per client address, so a password
//! cannot be guessed at the speed of the network.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The span failures are counted over.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// Failures per name within [`WINDOW`] before its logins are refused.
pub(crate) const PER_NAME: u32 = 5;

/// Failures per client address within [`WINDOW`] (one address may serve
/// several people, so it gets more).
pub(crate) const PER_CLIENT: u32 = 20;

/// Entries kept before expired ones are swept, bounding the memory a flood
/// of made-up names can take.
const SWEEP_AT: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Name(String),
    Client(IpAddr),
}

#[derive(Debug, Default)]
pub(crate) struct LoginLimiter {
    failures: Mutex<HashMap<Key, (Instant, u32)>>,
}

impl LoginLimiter {
    /// `Err(wait)` while `name` or `client` has failed too often.
    pub fn check(&self, name: &str, client: Option<IpAddr>) -> Result<(), Duration> {
        self.check_at(name, client, Instant::now())
    }

    fn check_at(&self, name: &str, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let wait = |key: &Key, limit: u32| match failures.get(key) {
            Some((since, n)) if *n >= limit && now < *since + WINDOW => Some(*since + WINDOW - now),
            _ => None,
        };
        let by_name = wait(&Key::Name(name.to_string()), PER_NAME);
        let by_client = client.and_then(|c| wait(&Key::Client(c), PER_CLIENT));
        match by_name.into_iter().chain(by_client).max() {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }

    /// Counts a failed login.
    pub fn failed(&self, name: &str, client: Option<IpAddr>) {
        self.failed_at(name, client, Instant::now());
    }

    fn failed_at(&self, name: &str, client: Option<IpAddr>, now: Instant) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= SWEEP_AT {
            failures.retain(|_, (since, _)| now < *since + WINDOW);
        }
        let keys = std::iter::once(Key::Name(name.to_string())).chain(client.map(Key::Client));
        for key in keys {
            let entry = failures.entry(key).or_insert((now, 0));
            if now >= entry.0 + WINDOW {
                *entry = (now, 0);
            }
            entry.1 += 1;
        }
    }

    /// A successful login clears the name's failures (not the address's).
    pub fn succeeded(&self, name: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&Key::Name(name.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_refused_after_its_failures_until_the_window_passes() {
        let limiter = LoginLimiter::default();
        let t0 = Instant::now();
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..PER_NAME {
            assert!(limiter.check_at("alice", Some(client), t0).is_ok());
            limiter.failed_at("alice", Some(client), t0);
        }
        let wait = limiter.check_at("alice", None, t0 + Duration::from_secs(10));
        assert_eq!(wait, Err(WINDOW - Duration::from_secs(10)));
        assert!(limiter.check_at("bob", Some(client), t0).is_ok());
        assert!(limiter.check_at("alice", None, t0 + WINDOW).is_ok());
        limiter.succeeded("alice");
        assert!(limiter.check_at("alice", None, t0).is_ok());
    }

    #[test]
    fn a_client_is_refused_after_failing_on_many_names() {
        let limiter = LoginLimiter::default();
        let t0 = Instant::now();
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        for i in 0..PER_CLIENT {
            limiter.failed_at(&format!("user{i}"), Some(client), t0);
        }
        assert!(limiter.check_at("someone", Some(client), t0).is_err());
        assert!(limiter.check_at("someone", None, t0).is_ok());
    }
}
