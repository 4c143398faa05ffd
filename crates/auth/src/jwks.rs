//! The JWKS cache: fetched over HTTP, read lock-free on every request, refreshed
//! periodically and when a token names a `kid` the cache does not hold.
//!
//! Why a rate limit and not "refetch on every unknown kid": the `kid` is chosen by whoever
//! sends the token, before anything is verified. Without a limit, a client sending tokens
//! with random `kid`s turns the gateway into an amplifier against the identity provider.
//! So a fetch caused by an unknown `kid` happens at most once per
//! `jwks_min_refresh_interval`; requests that arrive while a fetch is in flight wait for it
//! (one fetch, not one per request) and then look again. Periodic refreshes run in a
//! background task that holds only a weak reference, so dropping the verifier stops it.
//!
//! A failed fetch keeps the keys fetched before (stale keys beat no keys); it is retried at
//! the rate limit's pace.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::error::{AuthError, JwksError, Shown};
use crate::keys::{JwkKey, Key, parse_jwks};
use crate::token::Parsed;

/// Largest JWKS body accepted.
pub(crate) const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where key sets come from.
pub(crate) enum Fetcher {
    Http {
        client: reqwest::Client,
        url: reqwest::Url,
        timeout: Duration,
    },
    /// Test double: returns the body it is given, counting calls.
    #[cfg(test)]
    Fake(Arc<dyn Fn() -> Result<Vec<u8>, JwksError> + Send + Sync>),
}

impl Fetcher {
    fn url(&self) -> String {
        match self {
            Fetcher::Http { url, .. } => url.to_string(),
            #[cfg(test)]
            Fetcher::Fake(_) => "fake://jwks".into(),
        }
    }

    async fn fetch(&self) -> Result<Vec<u8>, JwksError> {
        match self {
            Fetcher::Http {
                client,
                url,
                timeout,
            } => {
                let shown = url.to_string();
                let fetch_err = |source| JwksError::Fetch {
                    url: shown.clone(),
                    source,
                };
                let mut resp = client
                    .get(url.clone())
                    .header(http::header::ACCEPT, "application/json")
                    .timeout(*timeout)
                    .send()
                    .await
                    .map_err(fetch_err)?;
                if !resp.status().is_success() {
                    return Err(JwksError::Status {
                        url: shown,
                        status: resp.status(),
                    });
                }
                let too_large = || JwksError::TooLarge {
                    url: url.to_string(),
                    limit: MAX_JWKS_BYTES,
                };
                if resp
                    .content_length()
                    .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
                {
                    return Err(too_large());
                }
                let mut body = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(fetch_err)? {
                    if body.len() + chunk.len() > MAX_JWKS_BYTES {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            }
            #[cfg(test)]
            Fetcher::Fake(f) => f(),
        }
    }
}

#[derive(Default)]
struct State {
    /// When the last fetch attempt ended, and whether it worked.
    last_done: Option<(Instant, bool)>,
    last_error: Option<Arc<JwksError>>,
}

/// The cache.
pub(crate) struct Jwks {
    fetcher: Fetcher,
    keys: ArcSwap<Vec<JwkKey>>,
    state: Mutex<State>,
    /// Bumped after every successful fetch.
    generation: AtomicU64,
    /// Held while fetching: one fetch at a time.
    fetching: tokio::sync::Mutex<()>,
    refresh_interval: Duration,
    min_interval: Duration,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.fetcher.url())
            .field("keys", &self.keys.load().len())
            .finish_non_exhaustive()
    }
}

/// The outcome of looking for a token's key.
pub(crate) enum Pick<'a> {
    Found(&'a Key),
    /// No key; a refresh might bring it.
    Missing(String),
    /// A definite refusal; a refresh would not help.
    Refused(AuthError),
}

/// Finds the key for a token: by `kid`, or the only key allowing its `alg` when it has none.
pub(crate) fn pick<'a>(keys: &'a [JwkKey], parsed: &Parsed<'_>) -> Pick<'a> {
    let alg = parsed.alg;
    match &parsed.kid {
        Some(kid) => {
            let mut seen = false;
            for k in keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
            {
                if k.allows(alg) {
                    return Pick::Found(&k.key);
                }
                seen = true;
            }
            if seen {
                Pick::Refused(AuthError::AlgNotAllowed {
                    alg: Shown::new(alg.as_str()),
                    detail: format!(": key {} is not a key for it", Shown::new(kid)),
                })
            } else {
                Pick::Missing(format!("kid {} is not in the key set", Shown::new(kid)))
            }
        }
        None => {
            let mut candidates = keys.iter().filter(|k| k.allows(alg));
            match (candidates.next(), candidates.next()) {
                (Some(k), None) => Pick::Found(&k.key),
                (None, _) => Pick::Missing(format!("token has no kid and no key allows {alg}")),
                (Some(_), Some(_)) => Pick::Refused(AuthError::UnknownKey(format!(
                    "token has no kid and several keys allow {alg}; a kid is required"
                ))),
            }
        }
    }
}

impl Jwks {
    pub(crate) fn new(
        fetcher: Fetcher,
        refresh_interval: Duration,
        min_interval: Duration,
    ) -> Arc<Jwks> {
        Arc::new(Jwks {
            fetcher,
            keys: ArcSwap::from_pointee(Vec::new()),
            state: Mutex::new(State::default()),
            generation: AtomicU64::new(0),
            fetching: tokio::sync::Mutex::new(()),
            refresh_interval,
            min_interval,
            task: Mutex::new(None),
        })
    }

    /// Starts the periodic refresh on `handle`; it ends when the cache is dropped.
    pub(crate) fn start(self: &Arc<Self>, handle: &tokio::runtime::Handle) {
        let task = handle.spawn(refresh_loop(Arc::downgrade(self)));
        if let Ok(mut slot) = self.task.lock() {
            *slot = Some(task.abort_handle());
        }
    }

    pub(crate) fn keys(&self) -> Arc<Vec<JwkKey>> {
        self.keys.load_full()
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn last_done(&self) -> Option<(Instant, bool)> {
        self.state.lock().map_or(None, |s| s.last_done)
    }

    pub(crate) fn last_error(&self) -> Option<Arc<JwksError>> {
        self.state.lock().map_or(None, |s| s.last_error.clone())
    }

    /// Whether an unknown-kid refresh is still held back by the rate limit.
    fn cooling_down(&self, now: Instant) -> bool {
        self.last_done()
            .is_some_and(|(at, _)| now < at + self.min_interval)
    }

    /// When the background task should fetch next.
    fn next_due(&self) -> Instant {
        match self.last_done() {
            None => Instant::now(),
            Some((at, true)) => at + self.refresh_interval,
            Some((at, false)) => at + self.min_interval.max(Duration::from_secs(1)),
        }
    }

    /// A token's `kid` was not found in the keys of `seen` generation: fetch again unless
    /// another fetch already did since, or the rate limit holds it back.
    pub(crate) async fn refresh_for_unknown_kid(&self, seen: u64) {
        if self.cooling_down(Instant::now()) {
            return;
        }
        let _guard = self.fetching.lock().await;
        if self.generation() != seen || self.cooling_down(Instant::now()) {
            return;
        }
        let _ = self.fetch_and_store("unknown kid").await;
    }

    /// Fetches now, ignoring the rate limit; returns how many keys are usable.
    pub(crate) async fn refresh_now(&self) -> Result<usize, Arc<JwksError>> {
        let _guard = self.fetching.lock().await;
        self.fetch_and_store("requested").await
    }

    /// One fetch. Call with `fetching` held.
    async fn fetch_and_store(&self, why: &'static str) -> Result<usize, Arc<JwksError>> {
        let result = match self.fetcher.fetch().await {
            Ok(body) => match parse_jwks(&body) {
                Ok((keys, skipped)) if !keys.is_empty() => {
                    if !skipped.is_empty() {
                        tracing::debug!(url = %self.fetcher.url(), ?skipped, "JWKS keys skipped");
                    }
                    Ok((keys, skipped))
                }
                Ok((_, skipped)) => Err(JwksError::Invalid {
                    url: self.fetcher.url(),
                    reason: format!("no usable signing key (skipped: {})", skipped.join("; ")),
                }),
                Err(reason) => Err(JwksError::Invalid {
                    url: self.fetcher.url(),
                    reason,
                }),
            },
            Err(e) => Err(e),
        };
        let now = Instant::now();
        match result {
            Ok((keys, _)) => {
                let n = keys.len();
                self.keys.store(Arc::new(keys));
                self.generation.fetch_add(1, Ordering::AcqRel);
                if let Ok(mut s) = self.state.lock() {
                    s.last_done = Some((now, true));
                    s.last_error = None;
                }
                tracing::debug!(url = %self.fetcher.url(), keys = n, why, "JWKS fetched");
                Ok(n)
            }
            Err(e) => {
                tracing::warn!(error = %e, why, "JWKS fetch failed; keeping the keys fetched before");
                let e = Arc::new(e);
                if let Ok(mut s) = self.state.lock() {
                    s.last_done = Some((now, false));
                    s.last_error = Some(e.clone());
                }
                Err(e)
            }
        }
    }
}

impl Drop for Jwks {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.task.lock()
            && let Some(task) = slot.take()
        {
            task.abort();
        }
    }
}

async fn refresh_loop(cache: Weak<Jwks>) {
    loop {
        let due = match cache.upgrade() {
            Some(c) => c.next_due(),
            None => return,
        };
        tokio::time::sleep_until(due).await;
        let Some(c) = cache.upgrade() else { return };
        if Instant::now() < c.next_due() {
            continue;
        }
        let _guard = c.fetching.lock().await;
        if Instant::now() >= c.next_due() {
            let _ = c.fetch_and_store("periodic").await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A valid P-256 JWK (the point is checked only when a signature is verified).
    fn jwks_body(kids: &[&str]) -> Vec<u8> {
        let x = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
        let y = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
        let keys: Vec<String> = kids
            .iter()
            .map(|k| format!(r#"{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}","kid":"{k}"}}"#))
            .collect();
        format!(r#"{{"keys":[{}]}}"#, keys.join(",")).into_bytes()
    }

    struct Fake {
        hits: Arc<AtomicUsize>,
        kids: Arc<Mutex<Vec<&'static str>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    fn fake(refresh: Duration, min: Duration) -> (Arc<Jwks>, Fake) {
        let hits = Arc::new(AtomicUsize::new(0));
        let kids = Arc::new(Mutex::new(vec!["a"]));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (h, k, f) = (hits.clone(), kids.clone(), fail.clone());
        let fetcher = Fetcher::Fake(Arc::new(move || {
            h.fetch_add(1, Ordering::SeqCst);
            if f.load(Ordering::SeqCst) {
                return Err(JwksError::Invalid {
                    url: "fake://jwks".into(),
                    reason: "down".into(),
                });
            }
            Ok(jwks_body(&k.lock().unwrap()))
        }));
        (Jwks::new(fetcher, refresh, min), Fake { hits, kids, fail })
    }

    fn kids(j: &Jwks) -> Vec<String> {
        j.keys().iter().filter_map(|k| k.kid.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_refresh_follows_the_interval_and_stops_on_drop() {
        let (jwks, fake) = fake(Duration::from_secs(300), Duration::from_secs(10));
        jwks.start(&tokio::runtime::Handle::current());
        // The first fetch happens at once.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fake.hits.load(Ordering::SeqCst), 1);
        assert_eq!(kids(&jwks), ["a"]);
        *fake.kids.lock().unwrap() = vec!["b"];
        tokio::time::sleep(Duration::from_secs(299)).await;
        assert_eq!(
            fake.hits.load(Ordering::SeqCst),
            1,
            "refreshed before the interval"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(fake.hits.load(Ordering::SeqCst), 2);
        assert_eq!(kids(&jwks), ["b"]);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(fake.hits.load(Ordering::SeqCst), 3);
        drop(jwks);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(
            fake.hits.load(Ordering::SeqCst),
            3,
            "task outlived the cache"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_kid_refreshes_are_rate_limited() {
        let (jwks, fake) = fake(Duration::from_secs(3600), Duration::from_secs(10));
        jwks.refresh_now().await.unwrap();
        assert_eq!(fake.hits.load(Ordering::SeqCst), 1);
        *fake.kids.lock().unwrap() = vec!["a", "b"];
        // Within the cooldown: 100 unknown kids, no fetch.
        for _ in 0..100 {
            jwks.refresh_for_unknown_kid(jwks.generation()).await;
        }
        assert_eq!(fake.hits.load(Ordering::SeqCst), 1);
        assert_eq!(kids(&jwks), ["a"]);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        jwks.refresh_for_unknown_kid(jwks.generation()).await;
        assert_eq!(fake.hits.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        // The cooldown has passed: exactly one fetch for a burst of 100.
        let seen = jwks.generation();
        let burst: Vec<_> = (0..100)
            .map(|_| {
                let j = jwks.clone();
                tokio::spawn(async move { j.refresh_for_unknown_kid(seen).await })
            })
            .collect();
        for t in burst {
            t.await.unwrap();
        }
        assert_eq!(fake.hits.load(Ordering::SeqCst), 2);
        assert_eq!(kids(&jwks), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_fetch_keeps_the_old_keys_and_is_retried_later() {
        let (jwks, fake) = fake(Duration::from_secs(60), Duration::from_secs(5));
        jwks.start(&tokio::runtime::Handle::current());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(kids(&jwks), ["a"]);
        fake.fail.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(fake.hits.load(Ordering::SeqCst), 2);
        assert_eq!(kids(&jwks), ["a"], "keys lost after a failed fetch");
        assert!(jwks.last_error().is_some());
        // Retried at the rate limit's pace, not the refresh interval's.
        fake.fail.store(false, Ordering::SeqCst);
        *fake.kids.lock().unwrap() = vec!["c"];
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(fake.hits.load(Ordering::SeqCst), 3);
        assert_eq!(kids(&jwks), ["c"]);
        assert!(jwks.last_error().is_none());
    }
}
