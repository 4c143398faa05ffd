//! The client side of `trellis sagas ls [--state S] | show ID | retry ID | abort ID`: calls
//! to the admin API over HTTP and the text the CLI prints.
//!
//! ```
//! use trellis_saga::cli::format_list;
//! let text = format_list(&serde_json::json!({"sagas": [], "next": null}));
//! assert!(text.starts_with("ID"));
//! ```

use std::time::Duration;

use serde_json::Value;

/// Talks to an admin server's `/v1/sagas` API.
#[derive(Debug, Clone)]
pub struct SagaAdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// A call to the admin API failed; the message says how.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server could not be reached or answered something that is not JSON.
    #[error("admin server {base}: {message}")]
    Transport {
        /// The server's base URL.
        base: String,
        /// What went wrong.
        message: String,
    },
    /// The server answered an error.
    #[error("{status} {kind}: {detail}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The `error` field.
        kind: String,
        /// The `detail` field.
        detail: String,
    },
}

impl SagaAdminClient {
    /// A client of the admin server at `admin` (`host:port` or a URL), with an optional
    /// bearer token.
    pub fn new(admin: &str, token: Option<String>) -> Result<Self, CliError> {
        let base = if admin.starts_with("http://") || admin.starts_with("https://") {
            admin.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", admin.trim_end_matches('/'))
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| CliError::Transport {
                base: base.clone(),
                message: format!("HTTP client: {e}"),
            })?;
        Ok(SagaAdminClient { base, token, http })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, CliError> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let transport = |message: String| CliError::Transport {
            base: self.base.clone(),
            message,
        };
        let response = request
            .send()
            .await
            .map_err(|e| transport(format!("unreachable: {e}")))?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| {
            transport(format!(
                "answered {status} with a body that is not JSON: {e}"
            ))
        })?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(CliError::Api {
                status: status.as_u16(),
                kind: body["error"].as_str().unwrap_or("error").to_owned(),
                detail: body["detail"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    /// `GET /v1/sagas[?state=S]`.
    pub async fn list(&self, state: Option<&str>, limit: Option<usize>) -> Result<Value, CliError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(state) = state {
            query.push(("state", state.to_owned()));
        }
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        let request = self
            .http
            .get(format!("{}/v1/sagas", self.base))
            .query(&query);
        self.send(request).await
    }

    /// `GET /v1/sagas/{id}`.
    pub async fn show(&self, id: &str) -> Result<Value, CliError> {
        self.send(self.http.get(format!("{}/v1/sagas/{id}", self.base)))
            .await
    }

    /// `POST /v1/sagas/{id}/retry`.
    pub async fn retry(&self, id: &str) -> Result<Value, CliError> {
        self.send(self.http.post(format!("{}/v1/sagas/{id}/retry", self.base)))
            .await
    }

    /// `POST /v1/sagas/{id}/abort`.
    pub async fn abort(&self, id: &str) -> Result<Value, CliError> {
        self.send(self.http.post(format!("{}/v1/sagas/{id}/abort", self.base)))
            .await
    }
}

/// `trellis sagas ls`: one line per saga.
pub fn format_list(body: &Value) -> String {
    let mut out = format!(
        "{:<38} {:<24} {:<16} {:<20} {:>10}  ERROR\n",
        "ID", "NAME", "STATE", "STEP", "ELAPSED"
    );
    for saga in body["sagas"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        out.push_str(&format!(
            "{:<38} {:<24} {:<16} {:<20} {:>8}ms  {}\n",
            text(&saga["id"]),
            format!("{} v{}", text(&saga["name"]), saga["version"]),
            text(&saga["state"]),
            text(&saga["step"]),
            saga["elapsed_ms"].as_u64().unwrap_or(0),
            saga["error"].as_str().unwrap_or(""),
        ));
    }
    if let Some(next) = body["next"].as_str() {
        out.push_str(&format!("(more: --after {next})\n"));
    }
    out
}

/// `trellis sagas show`: the saga, its steps with timings and errors, its history.
pub fn format_saga(saga: &Value) -> String {
    let mut out = format!(
        "saga {} ({} v{})\nstate: {}\nowner: {}\n",
        text(&saga["id"]),
        text(&saga["name"]),
        saga["version"],
        text(&saga["state"]),
        text(&saga["owner"]),
    );
    if let Some(error) = saga["error"].as_str() {
        out.push_str(&format!("error: {error}\n"));
    }
    out.push_str(&format!(
        "\n{:<24} {:<20} {:>8} {:>10} {:>8} {:>10}  ERROR\n",
        "STEP", "STATUS", "ATTEMPTS", "TOOK", "COMP.ATT", "COMP.TOOK"
    ));
    for step in saga["steps"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let error = step["compensation_error"]
            .as_str()
            .or(step["error"].as_str())
            .unwrap_or("");
        out.push_str(&format!(
            "{:<24} {:<20} {:>8} {:>10} {:>8} {:>10}  {error}\n",
            text(&step["name"]),
            text(&step["status"]),
            step["attempts"],
            millis(&step["duration_ms"]),
            step["compensation_attempts"],
            millis(&step["compensation_duration_ms"]),
        ));
    }
    out.push_str("\nHISTORY\n");
    for entry in saga["history"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        out.push_str(&format!(
            "{} {:<22} {:<20} {}\n",
            entry["at_ms"],
            text(&entry["event"]),
            entry["step"].as_str().unwrap_or(""),
            entry["error"].as_str().unwrap_or(""),
        ));
    }
    out
}

/// `trellis sagas retry|abort`: one line.
pub fn format_action(body: &Value) -> String {
    match body["requested"].as_str() {
        Some(requested) => format!(
            "saga {}: {requested} requested; its orchestrator picks it up shortly\n",
            text(&body["saga_id"])
        ),
        None => format!(
            "saga {}: {}\n",
            text(&body["saga_id"]),
            text(&body["state"])
        ),
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn millis(value: &Value) -> String {
    value
        .as_u64()
        .map_or_else(|| "-".into(), |ms| format!("{ms}ms"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_show_what_the_api_returns() {
        let list = json!({"sagas": [{"id": "a1", "name": "order", "version": 2, "state": "needs_attention",
            "step": "pay", "elapsed_ms": 12, "error": "refund failed"}], "next": "a1"});
        let text = format_list(&list);
        assert!(
            text.contains("a1") && text.contains("order v2") && text.contains("needs_attention")
        );
        assert!(text.contains("refund failed") && text.contains("--after a1"));
        let saga = json!({"id": "a1", "name": "order", "version": 2, "state": "compensated", "owner": "n1",
            "error": "step pay failed", "steps": [{"name": "pay", "status": "failed", "attempts": 1,
            "duration_ms": 5, "compensation_attempts": 0, "compensation_duration_ms": null, "error": "402"}],
            "history": [{"at_ms": 1, "event": "started"}]});
        let text = format_saga(&saga);
        assert!(text.contains("5ms") && text.contains("402") && text.contains("started"));
        assert!(
            format_action(&json!({"saga_id": "a1", "requested": "retry"}))
                .contains("retry requested")
        );
        assert!(format_action(&json!({"saga_id": "a1", "state": "aborted"})).contains("aborted"));
    }
}
