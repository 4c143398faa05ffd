//! Per-route authorization on the roles and scopes of a verified token.
//!
//! ```toml
//! [[gateway.routes]]
//! path = "/api/orders/*"
//! authorization = { roles = ["admin"], scopes = ["orders:write"], require = "any" }
//! ```

use serde::Deserialize;

use crate::claims::Claims;
use crate::error::{AuthzError, ConfigError, invalid};

/// How the listed roles and scopes combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Require {
    /// At least one listed role or scope (roles and scopes pooled together).
    #[default]
    Any,
    /// Every listed role and every listed scope.
    All,
}

/// A route's authorization rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Roles that grant access. Defaults to none.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Scopes that grant access. Defaults to none.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// `any` (one of the listed roles or scopes suffices) or `all` (every one is needed).
    /// Defaults to `any`.
    #[serde(default)]
    pub require: Require,
}

impl AuthzRule {
    /// A rule met by any one of the roles and scopes added next.
    pub fn any() -> Self {
        AuthzRule {
            roles: Vec::new(),
            scopes: Vec::new(),
            require: Require::Any,
        }
    }

    /// A rule met only by holding all the roles and scopes added next.
    pub fn all() -> Self {
        AuthzRule {
            require: Require::All,
            ..AuthzRule::any()
        }
    }

    /// Adds roles.
    #[must_use]
    pub fn roles<I, S>(mut self, roles: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.roles.extend(roles.into_iter().map(Into::into));
        self
    }

    /// Adds scopes.
    #[must_use]
    pub fn scopes<I, S>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.scopes.extend(scopes.into_iter().map(Into::into));
        self
    }

    /// Checks the rule: it must list something, and no empty names. The error names the key
    /// (`roles[1]`).
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.roles.is_empty() && self.scopes.is_empty() {
            return Err(invalid(
                "roles",
                "an authorization rule must list at least one role or scope",
            ));
        }
        for (key, list) in [("roles", &self.roles), ("scopes", &self.scopes)] {
            if let Some(i) = list.iter().position(|s| s.trim().is_empty()) {
                return Err(invalid(format!("{key}[{i}]"), "must not be empty"));
            }
        }
        Ok(self)
    }

    /// Whether the caller may pass. A rule listing nothing lets nobody pass (use
    /// [`AuthzRule::validate`] to catch it when reading config).
    pub fn authorize(&self, claims: &Claims) -> Result<(), AuthzError> {
        if self.roles.is_empty() && self.scopes.is_empty() {
            return Err(AuthzError::NoneOf {
                roles: Vec::new(),
                scopes: Vec::new(),
            });
        }
        match self.require {
            Require::Any => {
                let granted = self.roles.iter().any(|r| claims.has_role(r))
                    || self.scopes.iter().any(|s| claims.has_scope(s));
                if granted {
                    Ok(())
                } else {
                    Err(AuthzError::NoneOf {
                        roles: self.roles.clone(),
                        scopes: self.scopes.clone(),
                    })
                }
            }
            Require::All => {
                let missing_roles: Vec<String> = self
                    .roles
                    .iter()
                    .filter(|r| !claims.has_role(r))
                    .cloned()
                    .collect();
                let missing_scopes: Vec<String> = self
                    .scopes
                    .iter()
                    .filter(|s| !claims.has_scope(s))
                    .cloned()
                    .collect();
                if missing_roles.is_empty() && missing_scopes.is_empty() {
                    Ok(())
                } else {
                    Err(AuthzError::Missing {
                        missing_roles,
                        missing_scopes,
                    })
                }
            }
        }
    }
}
