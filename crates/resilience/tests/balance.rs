//! Load balancers: evenness, weighted splits, least-request preference, consistent-hash
//! stability, health, and passive outlier ejection under a paused tokio clock.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use tokio::time::advance;
use trellis_resilience::balance::{
    Endpoint, LoadBalancer, Outcome, OutlierDetection, PickContext, Picked, Strategy,
};

fn endpoints(n: usize) -> Vec<Endpoint<String>> {
    (0..n)
        .map(|i| Endpoint::new(format!("svc-{i}"), format!("127.0.0.1:{}", 3000 + i)))
        .collect()
}

fn counts(lb: &LoadBalancer<String>, picks: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..picks {
        let p = lb.pick(&PickContext::new()).expect("an endpoint");
        *counts.entry(p.id().to_owned()).or_default() += 1;
        p.report(Outcome::Success);
    }
    counts
}

#[test]
fn round_robin_over_three_endpoints_is_even() {
    let lb = LoadBalancer::new(Strategy::RoundRobin);
    lb.update(endpoints(3));
    let c = counts(&lb, 900);
    assert_eq!(c.len(), 3);
    for (id, n) in &c {
        assert!((299..=301).contains(n), "{id}: {n}");
    }
}

#[test]
fn round_robin_skips_unhealthy_and_drained_endpoints() {
    let lb = LoadBalancer::new(Strategy::RoundRobin);
    let mut eps = endpoints(4);
    eps[1] = eps[1].clone().with_health(false);
    eps[3] = eps[3].clone().with_weight(0);
    lb.update(eps);
    let c = counts(&lb, 600);
    assert_eq!(c.get("svc-0"), Some(&300));
    assert_eq!(c.get("svc-2"), Some(&300));
    assert_eq!(lb.eligible(), 2);

    lb.update(endpoints(2).into_iter().map(|e| e.with_health(false)));
    assert!(
        lb.pick(&PickContext::new()).is_none(),
        "no healthy instance"
    );
}

#[test]
fn random_is_roughly_uniform() {
    let lb = LoadBalancer::new(Strategy::Random);
    lb.update(endpoints(3));
    for (id, n) in counts(&lb, 3_000) {
        // Expected 1000, standard deviation ~26.
        assert!((850..=1150).contains(&n), "{id}: {n}");
    }
}

#[test]
fn weighted_blue_green_split_is_exact_per_cycle() {
    let lb = LoadBalancer::new(Strategy::Weighted);
    lb.update([
        Endpoint::new("blue", "10.0.0.1:80".to_owned()).with_weight(90),
        Endpoint::new("green", "10.0.0.2:80".to_owned()).with_weight(10),
    ]);
    let c = counts(&lb, 1_000);
    assert_eq!(c["blue"], 900);
    assert_eq!(c["green"], 100);
    // Interleaved, not 90 blue then 10 green: every 100 picks have 10 greens.
    let mut window = Vec::new();
    for _ in 0..100 {
        let p = lb.pick(&PickContext::new()).unwrap();
        window.push(p.id() == "green");
    }
    for chunk in window.chunks(25) {
        let greens = chunk.iter().filter(|&&g| g).count();
        assert!((1..=4).contains(&greens), "{greens} greens in 25 picks");
    }
    // Cut over: green takes everything.
    lb.update([
        Endpoint::new("blue", "10.0.0.1:80".to_owned()).with_weight(0),
        Endpoint::new("green", "10.0.0.2:80".to_owned()).with_weight(100),
    ]);
    assert_eq!(counts(&lb, 50).get("blue"), None);
}

proptest! {
    /// Any weights: after N picks each endpoint's share is within one cycle's slack of
    /// N × w / Σw, and exact on whole cycles.
    #[test]
    fn weighted_split_within_tolerance(weights in prop::collection::vec(1u32..=20, 2..=6), picks in 1usize..=2_000) {
        let lb = LoadBalancer::new(Strategy::Weighted);
        lb.update(weights.iter().enumerate().map(|(i, &w)| Endpoint::new(format!("e{i}"), String::new()).with_weight(w)));
        let total: u32 = weights.iter().sum();
        let c = counts(&lb, picks);
        for (i, &w) in weights.iter().enumerate() {
            let got = c.get(&format!("e{i}")).copied().unwrap_or(0) as f64;
            let want = picks as f64 * f64::from(w) / f64::from(total);
            prop_assert!((got - want).abs() <= f64::from(w), "e{i} weight {w}: {got} vs {want:.1}");
        }
        let lb2 = LoadBalancer::new(Strategy::Weighted);
        lb2.update(weights.iter().enumerate().map(|(i, &w)| Endpoint::new(format!("e{i}"), String::new()).with_weight(w)));
        let c = counts(&lb2, total as usize * 3);
        for (i, &w) in weights.iter().enumerate() {
            prop_assert_eq!(c[&format!("e{i}")], 3 * w as usize);
        }
    }
}

#[test]
fn least_request_prefers_less_loaded_endpoints() {
    let lb = LoadBalancer::new(Strategy::LeastRequest);
    lb.update(endpoints(3));
    // Hold every pick until svc-0 has 5 in flight and svc-1 2, then release down to
    // 5 / 2 / 0. (Both conditions: the draws are random, and svc-0 can reach 5 while
    // svc-1 holds only 1.)
    let mut held: Vec<Picked<String>> = Vec::new();
    let holding = |held: &[Picked<String>], id: &str| held.iter().filter(|p| p.id() == id).count();
    while holding(&held, "svc-0") < 5 || holding(&held, "svc-1") < 2 {
        assert!(held.len() < 1_000);
        held.push(lb.pick(&PickContext::new()).unwrap());
    }
    let mut keep: HashMap<&str, usize> = HashMap::from([("svc-0", 5), ("svc-1", 2), ("svc-2", 0)]);
    held.retain(|p| {
        let left = keep.get_mut(p.id()).unwrap();
        let kept = *left > 0;
        *left = left.saturating_sub(1);
        kept
    });
    let status: HashMap<String, usize> = lb
        .status()
        .into_iter()
        .map(|s| (s.id, s.in_flight))
        .collect();
    assert_eq!(
        (status["svc-0"], status["svc-1"], status["svc-2"]),
        (5, 2, 0)
    );

    let c = counts(&lb, 3_000);
    println!("least_request with in-flight 5/2/0: picks {c:?}");
    let (a, b, z) = (
        c.get("svc-0").copied().unwrap_or(0),
        c.get("svc-1").copied().unwrap_or(0),
        c.get("svc-2").copied().unwrap_or(0),
    );
    // Two distinct endpoints are drawn; the busiest never wins a draw.
    assert_eq!(a, 0);
    // svc-2 wins every pair it is in (2/3 of pairs), svc-1 the pair {0, 1}.
    assert!(z > 1_800 && b > 800, "svc-1 {b}, svc-2 {z}");
    drop(held);
    assert!(
        lb.status().iter().all(|s| s.in_flight == 0),
        "guards decrement on drop"
    );
}

fn ring_owner(lb: &LoadBalancer<String>, key: &str) -> String {
    let ctx = PickContext::new().with_hash_key(key.as_bytes());
    lb.pick(&ctx).unwrap().id().to_owned()
}

#[test]
fn consistent_hash_removing_one_of_ten_remaps_about_ten_percent() {
    let lb = LoadBalancer::new(Strategy::ConsistentHash);
    lb.update(endpoints(10));
    let keys: Vec<String> = (0..10_000).map(|i| format!("session-{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| ring_owner(&lb, k)).collect();
    // Stable: the same key always lands on the same endpoint.
    assert!(
        keys.iter()
            .zip(&before)
            .take(500)
            .all(|(k, o)| &ring_owner(&lb, k) == o)
    );
    // Spread: each endpoint owns a fair share (±40 % with 160 virtual nodes).
    let mut share: HashMap<&str, usize> = HashMap::new();
    for o in &before {
        *share.entry(o).or_default() += 1;
    }
    assert_eq!(share.len(), 10);
    assert!(
        share.values().all(|&n| (600..=1_400).contains(&n)),
        "{share:?}"
    );

    lb.update(endpoints(10).into_iter().filter(|e| e.id() != "svc-3"));
    let after: Vec<String> = keys.iter().map(|k| ring_owner(&lb, k)).collect();
    let moved: Vec<usize> = (0..keys.len()).filter(|&i| before[i] != after[i]).collect();
    assert!(
        moved.iter().all(|&i| before[i] == "svc-3"),
        "only the removed endpoint's keys move"
    );
    assert_eq!(moved.len(), share["svc-3"]);
    let fraction = moved.len() as f64 / keys.len() as f64;
    println!(
        "consistent hash: removing 1 of 10 endpoints remapped {:.2} % of 10 000 keys",
        fraction * 100.0
    );
    assert!(
        (0.05..=0.15).contains(&fraction),
        "{:.1} % remapped",
        fraction * 100.0
    );

    // Adding it back restores the original mapping exactly.
    lb.update(endpoints(10));
    assert!(
        keys.iter()
            .zip(&before)
            .all(|(k, o)| &ring_owner(&lb, k) == o)
    );
}

#[test]
fn consistent_hash_is_the_same_in_every_process_and_skips_unhealthy() {
    let a = LoadBalancer::new(Strategy::ConsistentHash);
    a.update(endpoints(5));
    let b = LoadBalancer::new(Strategy::ConsistentHash);
    b.update(endpoints(5).into_iter().rev());
    for i in 0..1_000 {
        let k = format!("user-{i}");
        assert_eq!(ring_owner(&a, &k), ring_owner(&b, &k), "{k}");
    }
    // An unhealthy endpoint's keys go elsewhere; nobody else's move.
    let before: Vec<String> = (0..1_000)
        .map(|i| ring_owner(&a, &format!("user-{i}")))
        .collect();
    let mut eps = endpoints(5);
    eps[2] = eps[2].clone().with_health(false);
    a.update(eps);
    for (i, owner) in before.iter().enumerate() {
        let now = ring_owner(&a, &format!("user-{i}"));
        if owner == "svc-2" {
            assert_ne!(now, "svc-2");
        } else {
            assert_eq!(&now, owner);
        }
    }
    // No key: still served.
    assert!(a.pick(&PickContext::new()).is_some());
}

fn fail(lb: &LoadBalancer<String>, id: &str, times: usize) {
    let mut done = 0;
    let mut attempts = 0;
    while done < times {
        attempts += 1;
        assert!(attempts < 10_000, "{id} is never picked");
        let p = lb.pick(&PickContext::new()).unwrap();
        if p.id() == id {
            p.report(Outcome::Failure);
            done += 1;
        }
    }
}

fn ejected_for(lb: &LoadBalancer<String>, id: &str) -> Option<Duration> {
    lb.status()
        .into_iter()
        .find(|s| s.id == id)
        .unwrap()
        .ejected_for
}

#[tokio::test(start_paused = true)]
async fn outliers_are_ejected_for_a_growing_period_and_come_back() {
    let lb = LoadBalancer::new(Strategy::RoundRobin);
    lb.update(endpoints(3));

    fail(&lb, "svc-1", 5);
    assert_eq!(ejected_for(&lb, "svc-1"), Some(Duration::from_secs(30)));
    let c = counts(&lb, 300);
    assert_eq!(c.get("svc-1"), None, "ejected: never picked");
    assert_eq!((c["svc-0"], c["svc-2"]), (150, 150));

    advance(Duration::from_secs(30)).await;
    let c = counts(&lb, 300);
    assert_eq!(
        c["svc-1"], 100,
        "back in rotation after the ejection period"
    );

    // Failing again soon after: ejected for twice as long.
    fail(&lb, "svc-1", 5);
    assert_eq!(ejected_for(&lb, "svc-1"), Some(Duration::from_secs(60)));
    advance(Duration::from_secs(59)).await;
    assert_eq!(counts(&lb, 30).get("svc-1"), None);
    advance(Duration::from_secs(1)).await;
    assert_eq!(counts(&lb, 30)["svc-1"], 10);

    // A long quiet period forgives the doublings.
    advance(Duration::from_secs(600)).await;
    fail(&lb, "svc-1", 5);
    assert_eq!(ejected_for(&lb, "svc-1"), Some(Duration::from_secs(30)));
    let s = lb.status().into_iter().find(|s| s.id == "svc-1").unwrap();
    assert_eq!(s.times_ejected, 3);
    assert_eq!(s.failures, 15);
}

#[tokio::test(start_paused = true)]
async fn never_more_than_the_max_percentage_is_ejected() {
    let lb = LoadBalancer::new(Strategy::RoundRobin);
    lb.update(endpoints(3));
    fail(&lb, "svc-0", 5);
    fail(&lb, "svc-1", 8);
    // 50 % of 3 rounds down to 1: svc-1 keeps serving although it fails.
    assert!(ejected_for(&lb, "svc-0").is_some());
    assert_eq!(ejected_for(&lb, "svc-1"), None);
    assert_eq!(lb.eligible(), 2);

    // A lone endpoint is never ejected.
    let single = LoadBalancer::new(Strategy::RoundRobin);
    single.update(endpoints(1));
    fail(&single, "svc-0", 50);
    assert!(single.pick(&PickContext::new()).is_some());
}

#[tokio::test(start_paused = true)]
async fn successes_reset_the_consecutive_count_and_settings_apply() {
    let lb: LoadBalancer<String> = LoadBalancer::builder(Strategy::RoundRobin)
        .outlier_detection(
            OutlierDetection::default()
                .consecutive_failures(3)
                .base_ejection(Duration::from_secs(10))
                .max_ejection(Duration::from_secs(15)),
        )
        .build()
        .unwrap();
    lb.update(endpoints(2));
    fail(&lb, "svc-0", 2);
    // A success in between: the count starts again.
    loop {
        let p = lb.pick(&PickContext::new()).unwrap();
        if p.id() == "svc-0" {
            p.report(Outcome::Success);
            break;
        }
    }
    fail(&lb, "svc-0", 2);
    assert_eq!(ejected_for(&lb, "svc-0"), None);
    fail(&lb, "svc-0", 1);
    assert_eq!(ejected_for(&lb, "svc-0"), Some(Duration::from_secs(10)));
    advance(Duration::from_secs(10)).await;
    fail(&lb, "svc-0", 3);
    assert_eq!(
        ejected_for(&lb, "svc-0"),
        Some(Duration::from_secs(15)),
        "capped at max_ejection"
    );

    let off: LoadBalancer<String> = LoadBalancer::builder(Strategy::RoundRobin)
        .without_outlier_detection()
        .build()
        .unwrap();
    off.update(endpoints(2));
    fail(&off, "svc-0", 100);
    assert_eq!(off.eligible(), 2);
}

#[tokio::test(start_paused = true)]
async fn updates_keep_the_state_of_endpoints_that_stay() {
    let lb = LoadBalancer::new(Strategy::RoundRobin);
    lb.update(endpoints(3));
    fail(&lb, "svc-2", 5);
    let held = lb.pick(&PickContext::new()).unwrap();
    let held_id = held.id().to_owned();
    // The registry snapshot changes: a new instance, svc-0 leaves.
    let mut next = endpoints(4);
    next.remove(0);
    lb.update(next);
    let status: HashMap<String, _> = lb.status().into_iter().map(|s| (s.id.clone(), s)).collect();
    assert_eq!(status.len(), 3);
    assert!(
        status["svc-2"].ejected_for.is_some(),
        "ejection survives the update"
    );
    if held_id != "svc-0" {
        assert_eq!(status[&held_id].in_flight, 1);
    }
    drop(held);
    assert!(lb.status().iter().all(|s| s.in_flight == 0));
    let json = serde_json::to_value(lb.status()).unwrap();
    assert_eq!(json[1]["id"], "svc-2");
    assert_eq!(json[1]["ejected_for"], 30_000);
}

#[test]
fn strategies_parse_from_config_names() {
    for s in [
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::LeastRequest,
        Strategy::Weighted,
        Strategy::ConsistentHash,
    ] {
        assert_eq!(s.to_string().parse::<Strategy>().unwrap(), s);
    }
    let err = "fastest".parse::<Strategy>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "load_balancer must be one of round_robin, random, least_request, weighted, consistent_hash, got \"fastest\""
    );
    assert!(
        LoadBalancer::<()>::builder(Strategy::RoundRobin)
            .virtual_nodes(0)
            .build()
            .is_err()
    );
    assert!(
        LoadBalancer::<()>::builder(Strategy::RoundRobin)
            .outlier_detection(OutlierDetection::default().max_ejected_percent(101))
            .build()
            .is_err()
    );
}
