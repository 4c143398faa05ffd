//! Nanoseconds per pick / admit for each balancer and the rate limiter, against an
//! `AtomicUsize::fetch_add` baseline measured in the same run.
//!
//! `cargo bench -p trellis-resilience --bench pick` runs the full measurement (each case
//! bounded to 2 000 000 iterations and about one second); without `--bench` (as under
//! `cargo test --all-targets`) it runs each case briefly as a smoke test.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use trellis_resilience::balance::{Endpoint, LoadBalancer, Outcome, PickContext, Strategy};
use trellis_resilience::breaker::{BreakerConfig, CircuitBreaker};
use trellis_resilience::ratelimit::{Gcra, Quota, RateLimiter};
use trellis_resilience::retry::RetryBudget;

struct Bench {
    iterations: u64,
    budget: Duration,
    baseline: Option<f64>,
}

impl Bench {
    /// Runs `f` in batches until the iteration or time budget is spent; prints ns/op.
    fn run(&mut self, name: &str, mut f: impl FnMut(u64)) -> f64 {
        // Warm-up.
        for i in 0..(self.iterations / 20).max(1) {
            f(i);
        }
        let start = Instant::now();
        let mut done = 0u64;
        while done < self.iterations && start.elapsed() < self.budget {
            for i in done..done + 10_000 {
                f(i);
            }
            done += 10_000;
        }
        let ns = start.elapsed().as_nanos() as f64 / done as f64;
        let ratio = self
            .baseline
            .map_or(String::new(), |b| format!("{:>7.1}×", ns / b));
        println!("{name:<44} {ns:>8.1} ns/op {ratio}  ({done} ops)");
        ns
    }

    /// The same across `threads` threads at once (per-op time per thread).
    fn run_threads(&mut self, name: &str, threads: usize, f: impl Fn(u64) + Sync) {
        let per_thread = self.iterations / threads as u64;
        let budget = self.budget;
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    let f = &f;
                    s.spawn(move || {
                        let mut done = 0;
                        let begun = Instant::now();
                        while done < per_thread && begun.elapsed() < budget {
                            for i in done..done + 10_000 {
                                f(i + (t as u64) * per_thread);
                            }
                            done += 10_000;
                        }
                        done
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let ns = start.elapsed().as_nanos() as f64 * threads as f64 / total as f64;
        let ratio = self
            .baseline
            .map_or(String::new(), |b| format!("{:>7.1}×", ns / b));
        println!("{name:<44} {ns:>8.1} ns/op {ratio}  ({total} ops, {threads} threads)");
    }
}

fn balancer(strategy: Strategy, n: usize) -> LoadBalancer<String> {
    let lb = LoadBalancer::new(strategy);
    lb.update((0..n).map(|i| {
        Endpoint::new(format!("svc-{i}"), format!("127.0.0.1:{}", 3000 + i))
            .with_weight(1 + (i as u32 % 3))
    }));
    lb
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mut b = Bench {
        iterations: if full { 2_000_000 } else { 20_000 },
        budget: if full {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(50)
        },
        baseline: None,
    };
    println!("# trellis-resilience: ns per operation (lower is better), ×: vs the baseline");

    let counter = AtomicUsize::new(0);
    let base = b.run("baseline: AtomicUsize::fetch_add", |_| {
        black_box(counter.fetch_add(1, Ordering::Relaxed));
    });
    b.baseline = Some(base);
    b.run("reference: std::time::Instant::now", |_| {
        black_box(Instant::now());
    });
    b.run("reference: tokio::time::Instant::now", |_| {
        black_box(tokio::time::Instant::now());
    });

    let ctx = PickContext::new();
    for strategy in [
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::LeastRequest,
        Strategy::Weighted,
        Strategy::ConsistentHash,
    ] {
        let lb = balancer(strategy, 10);
        if strategy == Strategy::ConsistentHash {
            let keys: Vec<String> = (0..1024).map(|i| format!("session-{i}")).collect();
            b.run("pick+drop consistent_hash (10 endpoints)", |i| {
                let key = keys[(i % 1024) as usize].as_bytes();
                black_box(lb.pick(&PickContext::new().with_hash_key(key)));
            });
        } else {
            b.run(&format!("pick+drop {strategy} (10 endpoints)"), |_| {
                black_box(lb.pick(&ctx));
            });
        }
    }
    let lb = balancer(Strategy::RoundRobin, 10);
    b.run("pick+report(success) round_robin", |_| {
        lb.pick(&ctx).unwrap().report(Outcome::Success);
    });
    let lb = balancer(Strategy::RoundRobin, 200);
    b.run("pick+drop round_robin (200 endpoints)", |_| {
        black_box(lb.pick(&ctx));
    });
    let lb = balancer(Strategy::LeastRequest, 10);
    b.run_threads("pick+drop least_request, contended", 2, |_| {
        black_box(lb.pick(&ctx));
    });

    let gcra = Gcra::new(Quota::parse("1000", "1s").unwrap());
    let mut tat = 0u64;
    b.run("Gcra::check (pure, one key)", |i| {
        black_box(gcra.check(&mut tat, i * 2_000_000).is_ok());
    });
    let limiter = RateLimiter::new(Quota::parse("1000000000", "1s").unwrap());
    b.run("RateLimiter::check, one hot key", |_| {
        black_box(limiter.check(None, "client-a").is_ok());
    });
    let keys: Vec<String> = (0..10_000)
        .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
        .collect();
    b.run("RateLimiter::check, 10 000 keys", |i| {
        black_box(limiter.check(None, &keys[(i % 10_000) as usize]).is_ok());
    });
    b.run_threads("RateLimiter::check, 10 000 keys, contended", 2, |i| {
        black_box(limiter.check(None, &keys[(i % 10_000) as usize]).is_ok());
    });

    let breaker = Arc::new(CircuitBreaker::new("bench", BreakerConfig::default()).unwrap());
    b.run("CircuitBreaker acquire+success", |_| {
        breaker.try_acquire().unwrap().success();
    });
    let budget = RetryBudget::default();
    b.run("RetryBudget::deposit", |_| budget.deposit());
}
