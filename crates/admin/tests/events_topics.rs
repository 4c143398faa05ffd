//! The node lists the event topics of services sharing its SQLite file, with their consumer
//! groups' exact lag, at `/v1/events/topics` (the dashboard's Events page).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_admin::{Node, Settings};
use trellis_events::{Event, EventBus, Message, StartFrom, SubscribeOptions};
use trellis_store::Store;

async fn get(node: &Node, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{}{path}", node.admin_addr()))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_of_a_service_on_the_same_file_show_with_their_lag() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/shared.db", dir.path().display());
    let text = format!("[store]\nurl = \"{url}\"\n[admin]\nlisten = \"127.0.0.1:0\"");
    let node = Node::start(Settings::from_toml(&text, "trellis.toml").unwrap())
        .await
        .unwrap();
    let (status, body) = get(&node, "/v1/events/topics").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topics"], serde_json::json!([]));
    assert_eq!(body["transport"], "embedded");

    // A "service": its own store handle on the node's file.
    let store = Store::open(&url).await.unwrap();
    let bus = EventBus::embedded(&store).unwrap();
    bus.transport().ensure_topic("orders", 1).await.unwrap();
    bus.publish_batch("orders", (0..6).map(Message::new))
        .await
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let counter = handled.clone();
    let subscription = bus
        .subscribe_with(
            "orders",
            "billing",
            SubscribeOptions::default().start(StartFrom::Earliest),
            move |_: Event<u32>| {
                counter.fetch_add(1, Ordering::SeqCst);
                std::future::ready(Ok::<(), String>(()))
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while bus
        .transport()
        .committed("orders", "billing")
        .await
        .unwrap()
        != [Some(6)]
    {
        assert!(Instant::now() < deadline, "billing never committed 6");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    subscription.shutdown().await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 6);
    bus.publish_batch("orders", (6..9).map(Message::new))
        .await
        .unwrap();

    let (status, body) = get(&node, "/v1/events/topics").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["topics"],
        serde_json::json!([{
            "name": "orders", "partitions": 1, "end_offset": 9,
            "groups": [{"group": "billing", "lag": 3, "uncommitted_partitions": 0}]
        }])
    );
    let (status, body) = get(&node, "/v1/events/topics/orders").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["end_offsets"], serde_json::json!([9]));
    assert_eq!(
        body["groups"][0]["partitions"],
        serde_json::json!([{"partition": 0, "end_offset": 9, "committed": 6, "lag": 3}])
    );

    let (status, body) = get(&node, "/v1/events/topics/payments").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("payments"),
        "{body}"
    );
    let (status, body) = get(&node, "/v1/events/topics/bad%20name").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("bad name"),
        "{body}"
    );
    node.shutdown().await.unwrap();
}

#[test]
fn the_events_bus_setting_is_checked() {
    let err = Settings::from_toml("[events]\nbus = \"rabbit://x\"", "t.toml").unwrap_err();
    assert!(err.to_string().contains("events.bus"), "{err}");
    assert!(err.to_string().contains("rabbit://x"), "{err}");
    let kafka = Settings::from_toml("[events]\nbus = \"kafka://127.0.0.1:9092\"", "t.toml");
    if cfg!(feature = "kafka") {
        assert!(kafka.is_ok());
    } else {
        let err = kafka.unwrap_err();
        assert!(err.to_string().contains("`kafka` feature"), "{err}");
    }
    let err = Settings::from_toml("[events]\nbrokers = 3", "t.toml").unwrap_err();
    assert!(err.to_string().contains("brokers"), "{err}");
}
