//! Choosing a transport by URL, as the CLI and `trellis up` do.

use trellis_store::Store;

use crate::bus::EventBus;
use crate::error::{EventError, Result};

impl EventBus {
    /// The bus named by `url`: `embedded` (the durable log inside `store`) or
    /// `kafka://host:port,…` (with the `kafka` feature; `store` is then unused).
    pub async fn from_url(url: &str, store: &Store) -> Result<EventBus> {
        if url == "embedded" {
            return EventBus::embedded(store);
        }
        if url.starts_with("kafka://") {
            return kafka(url).await;
        }
        Err(EventError::InvalidOption {
            option: "bus",
            reason: format!("{url:?} is neither `embedded` nor a kafka://host:port URL"),
        })
    }
}

#[cfg(feature = "kafka")]
async fn kafka(url: &str) -> Result<EventBus> {
    crate::kafka::bus_from_url(url).await
}

#[cfg(not(feature = "kafka"))]
async fn kafka(_url: &str) -> Result<EventBus> {
    Err(EventError::InvalidOption {
        option: "bus",
        reason: "this program was built without the kafka feature of trellis-events".into(),
    })
}
