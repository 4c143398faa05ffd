//! The admin API client behind `trellis services` and `trellis config`.

use serde_json::Value;

pub(crate) struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub(crate) fn new(admin: &str, token: Option<String>) -> Result<Self, String> {
        let base = if admin.starts_with("http://") || admin.starts_with("https://") {
            admin.trim_end_matches('/').to_owned()
        } else {
            format!("http://{admin}")
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Client { base, token, http })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, String> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .map_err(|e| format!("admin server {} unreachable: {e}", self.base))?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| {
            format!("admin server answered {status} with a body that is not JSON: {e}")
        })?;
        if status.is_success() {
            Ok(body)
        } else {
            let kind = body["error"].as_str().unwrap_or("error");
            let detail = body["detail"].as_str().unwrap_or("");
            Err(format!("{} {kind}: {detail}", status.as_u16()))
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn env_query(env: Option<&str>) -> Vec<(&'static str, String)> {
        env.map(|e| vec![("env", e.to_owned())]).unwrap_or_default()
    }

    pub(crate) async fn services_ls(&self) -> Result<(), String> {
        let body = self.send(self.http.get(self.url("/v1/services"))).await?;
        let services = body["services"].as_array().cloned().unwrap_or_default();
        println!("{:<40} INSTANCES", "SERVICE");
        for s in services {
            println!(
                "{:<40} {}",
                s["name"].as_str().unwrap_or("?"),
                s["instances"].as_u64().unwrap_or(0)
            );
        }
        if body["stale"].as_bool() == Some(true) {
            println!("(stale: the server cannot reach its store; showing its last snapshot)");
        }
        Ok(())
    }

    pub(crate) async fn config_get(&self, service: &str, env: Option<&str>) -> Result<(), String> {
        let request = self
            .http
            .get(self.url(&format!("/v1/config/{service}")))
            .query(&Self::env_query(env));
        print_json(&self.send(request).await?)
    }

    pub(crate) async fn config_set(
        &self,
        service: &str,
        env: Option<&str>,
        expected: Option<u64>,
        document: &Value,
    ) -> Result<(), String> {
        let mut query = Self::env_query(env);
        if let Some(expected) = expected {
            query.push(("expected_version", expected.to_string()));
        }
        let request = self
            .http
            .put(self.url(&format!("/v1/config/{service}")))
            .query(&query)
            .json(document);
        print_json(&self.send(request).await?)
    }

    pub(crate) async fn config_history(
        &self,
        service: &str,
        env: Option<&str>,
    ) -> Result<(), String> {
        let request = self
            .http
            .get(self.url(&format!("/v1/config/{service}/history")))
            .query(&Self::env_query(env));
        print_json(&self.send(request).await?)
    }

    pub(crate) async fn config_rollback(
        &self,
        service: &str,
        env: Option<&str>,
        version: u64,
    ) -> Result<(), String> {
        let mut query = Self::env_query(env);
        query.push(("version", version.to_string()));
        let request = self
            .http
            .post(self.url(&format!("/v1/config/{service}/rollback")))
            .query(&query);
        print_json(&self.send(request).await?)
    }
}

fn print_json(value: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}
