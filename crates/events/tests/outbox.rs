#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Transactional outbox, idempotent consumers and the CLI functions, on a SQLite file.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_events::cli::{ConsumeOptions, consume_json, publish_json};
use trellis_events::contract::eventually;
use trellis_events::{
    Dedup, Event, EventBus, EventError, Idempotency, Message, Outbox, Relay, RelayOptions,
};
use trellis_store::{Batch, BatchOutcome, Store};

const CHILD_VAR: &str = "TRELLIS_EVENTS_OUTBOX_CHILD";

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct UserCreated {
    id: String,
    email: String,
}

async fn open(dir: &tempfile::TempDir) -> (Store, EventBus) {
    let url = format!("sqlite://{}/outbox.db", dir.path().display());
    let store = Store::open(&url).await.unwrap();
    let bus = EventBus::embedded(&store).unwrap();
    (store, bus)
}

/// Writes the user and its event in one batch.
fn create_user(store: &Store, outbox: &Outbox, id: &str) -> (Batch, uuid::Uuid) {
    let users = store.table("users").unwrap();
    let user = UserCreated {
        id: id.to_owned(),
        email: format!("{id}@example.com"),
    };
    let mut batch = Batch::new();
    batch.add(
        users
            .mutation_insert_if_absent(id, "", serde_json::to_vec(&user).unwrap(), None)
            .unwrap(),
    );
    let event_id = outbox
        .stage(
            &mut batch,
            "users",
            Message::new(user).key(id).event_type("user.created"),
        )
        .unwrap();
    (batch, event_id)
}

/// Child half: commits a user with its event, says so, and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_child() {
    let Ok(url) = std::env::var(CHILD_VAR) else {
        return;
    };
    let store = Store::open(&url).await.unwrap();
    let outbox = Outbox::new(&store).unwrap();
    let (batch, id) = create_user(&store, &outbox, "u1");
    assert!(store.batch(batch).await.unwrap().applied());
    println!("COMMITTED {id}");
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_commit_and_relay_publishes_after_restart() {
    if std::env::var(CHILD_VAR).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/outbox.db", dir.path().display());
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "outbox_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // The harness may print "test outbox_child ... " on the same line.
    while !line.contains("COMMITTED ") {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "child exited early"
        );
    }
    let at = line.find("COMMITTED ").unwrap() + "COMMITTED ".len();
    let id: uuid::Uuid = line[at..].trim().parse().unwrap();
    child.kill().unwrap(); // SIGKILL: no relay ran in the child.
    child.wait().unwrap();

    let (store, bus) = open(&dir).await;
    let outbox = Outbox::new(&store).unwrap();
    let pending = outbox.pending(10).await.unwrap();
    assert_eq!(
        pending.len(),
        1,
        "the event survived the crash in the outbox"
    );
    assert_eq!(
        bus.transport().partition_count("users").await.unwrap(),
        None
    );

    let log: Arc<Mutex<Vec<Event<UserCreated>>>> = Arc::default();
    let sub = {
        let log = log.clone();
        bus.subscribe("users", "welcome", move |e: Event<UserCreated>| {
            log.lock().unwrap().push(e);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap()
    };
    let relay = Relay::spawn(outbox.clone(), bus.clone(), RelayOptions::default());
    eventually("the relayed event", || async {
        log.lock().unwrap().len() == 1
    })
    .await;
    eventually("an empty outbox", || async {
        outbox.pending(10).await.unwrap().is_empty()
    })
    .await;
    relay.shutdown().await;
    sub.shutdown().await.unwrap();
    let event = log.lock().unwrap()[0].clone();
    assert_eq!(event.id, id, "the staged id is the published id");
    assert_eq!(event.event_type, "user.created");
    assert_eq!(event.payload.email, "u1@example.com");
    let ends = bus.transport().end_offsets("users").await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 1, "published exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_batch_never_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bus) = open(&dir).await;
    let outbox = Outbox::new(&store).unwrap();
    let (batch, _) = create_user(&store, &outbox, "u1");
    assert!(store.batch(batch).await.unwrap().applied());
    // The same user again: the insert-if-absent fails, so the whole batch is rejected.
    let (again, _) = create_user(&store, &outbox, "u1");
    let outcome = store.batch(again).await.unwrap();
    assert!(matches!(outcome, BatchOutcome::Rejected { index: 0, .. }));
    assert_eq!(outbox.relay_once(&bus).await.unwrap(), 1, "only the first");
    assert_eq!(outbox.relay_once(&bus).await.unwrap(), 0);
    let ends = bus.transport().end_offsets("users").await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 1);
    assert!(outbox.pending(10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_crash_after_publish_is_deduplicated_by_idempotency() {
    let dir = tempfile::tempdir().unwrap();
    let (store, bus) = open(&dir).await;
    let outbox = Outbox::new(&store).unwrap();
    let (batch, id) = create_user(&store, &outbox, "u2");
    store.batch(batch).await.unwrap();
    // A relay that published and crashed before deleting: the event goes out twice.
    bus.publish_envelopes(outbox.pending(10).await.unwrap())
        .await
        .unwrap();
    assert_eq!(outbox.relay_once(&bus).await.unwrap(), 1);
    let ends = bus.transport().end_offsets("users").await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 2, "at least once: a duplicate");

    let dedup = Idempotency::new(&store, "mailer").unwrap();
    let mails = store.table("mails").unwrap();
    let outcomes: Arc<Mutex<Vec<Dedup>>> = Arc::default();
    let sub = {
        let outcomes = outcomes.clone();
        bus.subscribe("users", "mailer", move |e: Event<UserCreated>| {
            let (dedup, mails, outcomes) = (dedup.clone(), mails.clone(), outcomes.clone());
            async move {
                let effect = Batch::new().push(mails.mutation_put(
                    &e.payload.id,
                    &e.id.to_string(),
                    e.payload.email.into_bytes(),
                    None,
                )?);
                let outcome = dedup.apply(e.id, effect).await?;
                outcomes.lock().unwrap().push(outcome);
                Ok::<(), EventError>(())
            }
        })
        .await
        .unwrap()
    };
    eventually("both deliveries", || async {
        outcomes.lock().unwrap().len() == 2
    })
    .await;
    sub.shutdown().await.unwrap();
    assert_eq!(
        *outcomes.lock().unwrap(),
        [Dedup::Applied, Dedup::Duplicate]
    );
    let mail_rows = store
        .table("mails")
        .unwrap()
        .scan_all("u2", None)
        .await
        .unwrap();
    assert_eq!(mail_rows.len(), 1);
    assert_eq!(mail_rows[0].clustering, id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_run_and_failed_effects() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir).await;
    let dedup = Idempotency::new(&store, "g").unwrap();
    let id = uuid::Uuid::now_v7();
    let calls = Arc::new(Mutex::new(0));
    let effect = || {
        let calls = calls.clone();
        async move {
            *calls.lock().unwrap() += 1;
            Ok::<(), String>(())
        }
    };
    assert_eq!(dedup.run(id, effect).await.unwrap(), Ok(Dedup::Applied));
    assert_eq!(dedup.run(id, effect).await.unwrap(), Ok(Dedup::Duplicate));
    assert_eq!(*calls.lock().unwrap(), 1);
    // A failing effect leaves no mark, so the retry runs it again.
    let other = uuid::Uuid::now_v7();
    let failed = dedup
        .run(other, || async { Err::<(), _>("smtp down") })
        .await
        .unwrap();
    assert_eq!(failed, Err("smtp down"));
    assert!(!dedup.is_processed(other).await.unwrap());
    // Effects whose own condition fails are not applied and leave no mark.
    let t = store.table("accounts").unwrap();
    t.put("a", "", b"1".to_vec(), None).await.unwrap();
    let effects = Batch::new().push(
        t.mutation_update_if_version("a", "", 99, b"2".to_vec(), None)
            .unwrap(),
    );
    let err = dedup.apply(other, effects).await.unwrap_err();
    assert!(err.to_string().contains("condition of mutation 0"), "{err}");
    assert!(!dedup.is_processed(other).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publish_and_consume_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (_, bus) = open(&dir).await;
    for n in 0..5 {
        publish_json(&bus, "orders", &format!(r#"{{"n":{n}}}"#), Some("k"))
            .await
            .unwrap();
    }
    let err = publish_json(&bus, "orders", "{not json", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("payload argument") && err.contains("column"),
        "{err}"
    );

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let lines = |out: &Shared| -> Vec<serde_json::Value> {
        String::from_utf8(out.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let out = Shared::default();
    let options = ConsumeOptions::new("cli").from_beginning(true).max(Some(3));
    let n = tokio::time::timeout(
        Duration::from_secs(30),
        consume_json(&bus, "orders", options.clone(), out.clone()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(n, 3);
    let first = lines(&out);
    assert_eq!(first.len(), 3, "exactly --max lines");
    for (i, line) in first.iter().enumerate() {
        assert_eq!(line["payload"]["n"], i as u64);
        assert_eq!(line["offset"], i as u64);
        assert_eq!(line["topic"], "orders");
        assert_eq!(line["key"], "k");
        assert_eq!(line["specversion"], "1.0");
        assert!(line["partition"].is_u64() && line["id"].is_string());
    }
    // The group goes on where it stopped.
    let out2 = Shared::default();
    // (A fresh StopSignal: clones of options share theirs, and the first one was given.)
    let options = ConsumeOptions::new("cli").from_beginning(true).max(Some(2));
    let n = consume_json(&bus, "orders", options, out2.clone())
        .await
        .unwrap();
    assert_eq!(n, 2);
    let offsets: Vec<u64> = lines(&out2)
        .iter()
        .map(|l| l["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [3, 4]);
    // A new group without --from-beginning only sees new events.
    let out3 = Shared::default();
    let stop = trellis_events::StopSignal::new();
    let latest = ConsumeOptions::new("late").max(Some(1)).stop(stop.clone());
    let consumer = {
        let bus = bus.clone();
        let out3 = out3.clone();
        tokio::spawn(async move { consume_json(&bus, "orders", latest, out3).await })
    };
    eventually("the late group to own its partitions", || async {
        bus.transport()
            .committed("orders", "late")
            .await
            .unwrap()
            .iter()
            .all(Option::is_some)
    })
    .await;
    publish_json(&bus, "orders", r#"{"n":99}"#, Some("k"))
        .await
        .unwrap();
    assert_eq!(consumer.await.unwrap().unwrap(), 1);
    assert_eq!(lines(&out3)[0]["payload"]["n"], 99);
    // Bad names are named.
    let err = consume_json(
        &bus,
        "bad/topic",
        ConsumeOptions::new("g"),
        Shared::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("invalid topic"), "{err}");
}
