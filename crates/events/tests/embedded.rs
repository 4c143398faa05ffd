#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! The transport contract on the embedded log in a SQLite file.

use std::sync::OnceLock;

use trellis_events::{EventBus, transport_contract_tests};
use trellis_store::Store;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap())
}

/// A new store handle (its own connections, as another process has) on the shared file.
async fn open() -> EventBus {
    let url = format!("sqlite://{}/events.db", dir().path().display());
    let store = Store::open(&url).await.unwrap();
    EventBus::embedded(&store).unwrap()
}

transport_contract_tests!(open);

/// A member that stalls past its session loses its partitions: the new owner gets them,
/// and the stalled member's commit is refused (fenced), so offsets never go backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_member_is_fenced() {
    use std::time::Duration;
    use trellis_events::transport::{Fetch, JoinOptions};
    use trellis_events::{EventError, Message, StartFrom};

    let bus = open().await;
    let topic = trellis_events::contract::nonce("fenced");
    let transport = bus.transport();
    transport.ensure_topic(&topic, 1).await.unwrap();
    bus.publish(&topic, Message::new(1)).await.unwrap();
    let join = |member: &str| JoinOptions {
        member: member.to_owned(),
        partitions: 1,
        start: StartFrom::Earliest,
        session_timeout: Duration::from_millis(300),
        poll_interval: Duration::from_millis(2),
    };
    let mut a = transport.join(&topic, "g", join("a")).await.unwrap();
    let mut claim_a = a.next_claim().await.unwrap();
    assert!(matches!(claim_a.fetch(10).await.unwrap(), Fetch::Records(r) if r.len() == 1));
    // Member a stalls: its heartbeats stop, its claim object lives on.
    drop(a);
    let mut b = transport.join(&topic, "g", join("b")).await.unwrap();
    let claim_b = tokio::time::timeout(Duration::from_secs(30), b.next_claim())
        .await
        .expect("b takes over after a's lease expired")
        .unwrap();
    assert_eq!(claim_b.position(), 0, "b starts from the last commit");
    let err = claim_a.commit(1).await.unwrap_err();
    assert!(matches!(err, EventError::Fenced { .. }), "{err}");
    assert!(err.to_string().contains("held by b"), "{err}");
    assert_eq!(
        transport.committed(&topic, "g").await.unwrap(),
        [Some(0)],
        "the fenced commit did not land"
    );
    claim_b.release().await.unwrap();
    b.leave().await.unwrap();
}

/// A subscriber whose lease is lost while it handles a batch (here another member takes
/// the partition and hands it back at once; in the wild, a stall longer than the session)
/// is fenced at its commit — and then claims the partition again and goes on from the last
/// commit, re-delivering the batch. (It used to keep the fenced partition as "held"
/// forever: heartbeating, consuming nothing, keeping the others away.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_subscriber_claims_its_partition_again() {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use trellis_events::{Event, Message, StartFrom, SubscribeOptions};

    let url = format!("sqlite://{}/events.db", dir().path().display());
    let store = Store::open(&url).await.unwrap();
    let bus = EventBus::embedded(&store).unwrap();
    let topic = trellis_events::contract::nonce("refence");
    bus.transport().ensure_topic(&topic, 1).await.unwrap();
    for n in 0..3u64 {
        bus.publish(&topic, Message::new(n)).await.unwrap();
    }
    let seen: Arc<Mutex<Vec<u64>>> = Arc::default();
    let groups = store.table("event_groups").unwrap();
    let (pk, handler_seen) = (format!("g/{topic}"), seen.clone());
    let options = SubscribeOptions::default()
        .start(StartFrom::Earliest)
        .session_timeout(Duration::from_millis(300));
    let sub = bus
        .subscribe_with(&topic, "g", options, move |event: Event<u64>| {
            let (groups, pk, seen) = (groups.clone(), pk.clone(), handler_seen.clone());
            async move {
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(event.payload);
                    seen.len() == 1
                };
                if first {
                    // Another member takes the lease and releases it again.
                    let intruder = br#"{"member":"intruder","released":true}"#.to_vec();
                    groups
                        .put(&pk, "owner/00000", intruder, Some(Duration::from_secs(60)))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let committed = bus.transport().committed(&topic, "g").await.unwrap();
        if committed == [Some(3)] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fenced subscriber never consumed its partition again: committed {committed:?}, handled {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sub.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|n| **n == 0).count(),
        2,
        "the batch of the fenced commit is delivered again: {seen:?}"
    );
    let mut distinct = seen.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct, [0, 1, 2], "{seen:?}");
}
