//! Typed validation: the shape a service's configuration must have.
//!
//! Documents are stored as JSON; a Rust type is attached to a service with
//! [`ConfigurationManager::register_type`](crate::ConfigurationManager::register_type).
//! Checking is "merge over the defaults, then deserialize", the same path
//! [`get_config`](crate::ConfigurationManager::get_config) takes, so a document accepted
//! by a write is one the service can read. Errors go through `serde_path_to_error` so they
//! name the offending field (`cache.ttl`), not a line and column of a text nobody wrote.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a document does not fit: where, and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// Dotted path (`cache.ttl`), `.` for the root.
    pub(crate) path: String,
    /// The problem at that path.
    pub(crate) message: String,
}

impl Rejection {
    fn root(message: impl Into<String>) -> Self {
        Rejection {
            path: ".".to_owned(),
            message: message.into(),
        }
    }
}

/// Checks one document of one service.
type Check = Arc<dyn Fn(&Value) -> Result<(), Rejection> + Send + Sync>;

/// The registered types, by service name.
#[derive(Default)]
pub(crate) struct Schemas {
    checks: RwLock<HashMap<String, Check>>,
}

impl Schemas {
    /// From now on, documents of `service` must deserialize into `T` once merged over
    /// `defaults`. Replaces an earlier registration.
    pub(crate) fn register<T>(&self, service: &str, defaults: T)
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let check: Check = match serde_json::to_value(&defaults) {
            Ok(defaults) => {
                Arc::new(move |doc: &Value| merge_into::<T>(defaults.clone(), Some(doc)).map(drop))
            }
            Err(e) => {
                // Registration cannot fail, so every write is refused with the reason.
                tracing::error!(service, error = %e, "registered config defaults do not serialize");
                let message = format!("the registered defaults do not serialize: {e}");
                Arc::new(move |_: &Value| Err(Rejection::root(message.clone())))
            }
        };
        self.checks
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(service.to_owned(), check);
    }

    /// Checks `doc` as a configuration document of `service`.
    pub(crate) fn check(&self, service: &str, doc: &Value) -> Result<(), Rejection> {
        require_object(doc)?;
        let check = self
            .checks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(service)
            .cloned();
        match check {
            Some(check) => check(doc),
            None => Ok(()),
        }
    }
}

/// A configuration document is a JSON object.
pub(crate) fn require_object(doc: &Value) -> Result<(), Rejection> {
    if doc.is_object() {
        return Ok(());
    }
    let found = match doc {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    Err(Rejection::root(format!(
        "a configuration document must be a JSON object, found {found}"
    )))
}

/// Merges `doc` over `defaults` (RFC 7386) and deserializes the result into `T`.
pub(crate) fn merge_into<T: DeserializeOwned>(
    mut defaults: Value,
    doc: Option<&Value>,
) -> Result<T, Rejection> {
    if let Some(doc) = doc {
        trellis_store::json::merge_patch(&mut defaults, doc);
    }
    serde_path_to_error::deserialize(defaults).map_err(|e| Rejection {
        path: e.path().to_string(),
        message: e.into_inner().to_string(),
    })
}

/// Serializes the caller's defaults.
pub(crate) fn defaults_value<T: Serialize>(defaults: &T) -> Result<Value, Rejection> {
    serde_json::to_value(defaults)
        .map_err(|e| Rejection::root(format!("the defaults do not serialize: {e}")))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Cache {
        enabled: bool,
        ttl: u64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Config {
        cache: Cache,
        hosts: Vec<String>,
    }

    fn defaults() -> Config {
        Config {
            cache: Cache {
                enabled: true,
                ttl: 3600,
            },
            hosts: vec!["a".into()],
        }
    }

    #[test]
    fn merge_keeps_nested_defaults() {
        let merged: Config = merge_into(
            serde_json::to_value(defaults()).unwrap(),
            Some(&json!({"cache": {"ttl": 5}})),
        )
        .unwrap();
        assert_eq!(
            merged.cache,
            Cache {
                enabled: true,
                ttl: 5
            }
        );
        assert_eq!(merged.hosts, ["a"]);
    }

    #[test]
    fn errors_name_the_field_path() {
        let schemas = Schemas::default();
        schemas.register("svc", defaults());
        let err = schemas
            .check("svc", &json!({"cache": {"ttl": "x"}}))
            .unwrap_err();
        assert_eq!(err.path, "cache.ttl");
        assert_eq!(err.message, r#"invalid type: string "x", expected u64"#);
        let err = schemas.check("svc", &json!({"hosts": [1]})).unwrap_err();
        assert_eq!(err.path, "hosts[0]");
        // Removing a required field with null is caught too.
        let err = schemas
            .check("svc", &json!({"cache": {"ttl": null}}))
            .unwrap_err();
        assert_eq!(err.path, "cache");
        assert!(
            err.message.contains("missing field `ttl`"),
            "{}",
            err.message
        );
        assert_eq!(schemas.check("svc", &json!({"cache": {"ttl": 1}})), Ok(()));
        // Other services are only checked for being objects.
        assert_eq!(schemas.check("other", &json!({"cache": "x"})), Ok(()));
    }

    #[test]
    fn documents_must_be_objects() {
        let schemas = Schemas::default();
        for doc in [json!(null), json!(1), json!("x"), json!([1]), json!(true)] {
            let err = schemas.check("svc", &doc).unwrap_err();
            assert_eq!(err.path, ".");
            assert!(
                err.message
                    .starts_with("a configuration document must be a JSON object")
            );
        }
    }
}
