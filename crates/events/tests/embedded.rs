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
