//! Who may use which device: `[[access]]` rules naming a client (by the
//! name its key has in `authorized_clients`, or `*` for any client) and the
//! devices it may list and open (PCI names and USB bus ids, or `*`).
//!
//! Without rules every client that gets in may use every device. With
//! rules a client sees only the devices some rule gives it: the others are
//! missing from its lists and opening one fails as for a device that does
//! not exist. A client known by no name (a plaintext link, or TLS with a
//! pre-shared key and no authorized_clients entry) matches `*` rules only.

use serde::Deserialize;

/// One `[[access]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A client name from `authorized_clients`, or `*`.
    pub client: String,
    /// Device names and USB bus ids, or `*`.
    pub devices: Vec<String>,
}

/// The rules in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    rules: Vec<Rule>,
}

impl Access {
    /// Rules as the config file gives them; an empty name is an error.
    pub fn new(rules: Vec<Rule>) -> Result<Self, String> {
        for (i, r) in rules.iter().enumerate() {
            if r.client.is_empty() || r.devices.iter().any(String::is_empty) {
                return Err(format!(
                    "[[access]] table {}: empty client or device name",
                    i + 1
                ));
            }
        }
        Ok(Self { rules })
    }

    /// True when no rule restricts anything.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
    }

    /// May `client` (its name, `None` for a client known by no name) list
    /// and open `device`?
    pub fn allows(&self, client: Option<&str>, device: &str) -> bool {
        self.is_open()
            || self.rules.iter().any(|r| {
                (r.client == "*" || Some(r.client.as_str()) == client)
                    && r.devices.iter().any(|d| d == "*" || d == device)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(client: &str, devices: &[&str]) -> Rule {
        Rule {
            client: client.into(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
        }
    }

    #[test]
    fn rules_give_devices_to_names_and_to_everyone() {
        assert!(Access::default().allows(None, "edu0"));
        let a = Access::new(vec![
            rule("alice", &["edu0", "1-1"]),
            rule("bob", &["*"]),
            rule("*", &["mem0"]),
        ])
        .unwrap();
        assert!(a.allows(Some("alice"), "edu0") && a.allows(Some("alice"), "1-1"));
        assert!(!a.allows(Some("alice"), "nic0"));
        assert!(a.allows(Some("bob"), "nic0"));
        assert!(a.allows(Some("carol"), "mem0") && a.allows(None, "mem0"));
        assert!(!a.allows(None, "edu0"));
        assert!(Access::new(vec![rule("", &["x"])]).is_err());
    }
}
