//! Kubernetes' name rules, for the names that end up in rendered resources and DNS.

/// RFC 1123 label, as Kubernetes checks namespaces and most object names: 1 to 63 lower-case
/// letters, digits and `-`, starting and ending with a letter or digit.
pub(crate) fn check_dns_label(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty; a DNS label needs 1 to 63 characters".to_owned());
    }
    if value.len() > 63 {
        return Err(format!(
            "{value:?} is {} characters long; a DNS label has at most 63",
            value.len()
        ));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "{value:?} contains {c:?}; a DNS label has only lower-case letters, digits and '-'"
        ));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(format!(
            "{value:?} must start and end with a letter or digit"
        ));
    }
    Ok(())
}

/// RFC 1123 subdomain: dot-separated DNS labels, at most 253 characters.
pub(crate) fn check_dns_subdomain(value: &str) -> Result<(), String> {
    if value.len() > 253 {
        return Err(format!(
            "is {} characters long; a DNS name has at most 253",
            value.len()
        ));
    }
    value.split('.').try_for_each(check_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "user-service", "9lives", &"a".repeat(63)] {
            assert_eq!(check_dns_label(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(check_dns_label(bad).is_err(), "{bad}");
        }
        assert!(check_dns_subdomain("cluster.local").is_ok());
        assert!(check_dns_subdomain("cluster..local").is_err());
    }
}
