//! The pieces every rendered Kubernetes object shares, and the YAML emitter.
//!
//! Objects are typed structs serialized with serde-saphyr: field order is the declaration
//! order and maps are `BTreeMap`s, so the same input always gives the same bytes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::error::MeshError;

/// `metadata` of a rendered object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ObjectMeta {
    pub(crate) name: String,
    pub(crate) namespace: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) annotations: BTreeMap<String, String>,
}

/// A rendered object: `apiVersion`, `kind`, `metadata`, `spec`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Object<S> {
    pub(crate) api_version: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) metadata: ObjectMeta,
    pub(crate) spec: S,
}

/// The label every rendered object carries.
pub(crate) fn managed_by() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_owned(),
        "trellis".to_owned(),
    )])
}

/// Serializes one object as a YAML document (no `---` line).
pub(crate) fn to_yaml<T: Serialize>(object: &T) -> Result<String, MeshError> {
    serde_saphyr::to_string(object).map_err(|e| MeshError::Emit(e.to_string()))
}

/// Joins YAML documents into one multi-document stream.
pub(crate) fn join_documents(header: &str, documents: &[String]) -> String {
    let mut out = String::from(header);
    for (i, doc) in documents.iter().enumerate() {
        if i > 0 || !header.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(doc);
        if !doc.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// A duration in the form every provider parses (Go's `time.ParseDuration`, protobuf
/// durations as Istio reads them, Linkerd's annotation parser): whole seconds as `"30s"`,
/// anything else as milliseconds (`"1500ms"`). Validation guarantees whole milliseconds.
pub(crate) fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_text(Duration::from_secs(30)), "30s");
        assert_eq!(duration_text(Duration::from_secs(3600)), "3600s");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration_text(Duration::from_millis(1)), "1ms");
    }

    #[test]
    fn join() {
        let docs = ["a: 1\n".to_owned(), "b: 2".to_owned()];
        assert_eq!(join_documents("", &docs), "a: 1\n---\nb: 2\n");
        assert_eq!(
            join_documents("# h\n", &docs),
            "# h\n---\na: 1\n---\nb: 2\n"
        );
    }
}
