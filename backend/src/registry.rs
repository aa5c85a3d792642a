//! The devices a backend serves, and which session owns each one.
//!
//! Opening a device moves it out of the registry into a [`Lease`]; dropping
//! the lease (on close, session end or a panic) puts it back. So one session
//! owns a device at a time and no code path can forget to release it.

use std::sync::{Arc, Mutex, MutexGuard};

use cio_core::wire::DeviceSummary;
use cio_core::{Device, DeviceInfo};

struct Slot {
    info: DeviceInfo,
    device: Option<Box<dyn Device>>,
    owner: Option<u64>,
    release: Release,
    /// The release policy of a device without a full reset was logged.
    announced: bool,
}

/// What releasing a device that has no reset clearing its state does
/// (`DeviceInfo::reset`): the next session inherits what is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Release {
    /// Clear what can be cleared: bus mastering off, INTx disabled (MSI
    /// and MSI-X are disabled for every device on release anyway).
    #[default]
    Clear,
    /// Hand the device on exactly as the last session left it.
    AsIs,
}

impl std::fmt::Display for Release {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Clear => "clear",
            Self::AsIs => "as-is",
        })
    }
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No device by that name.
    #[error("no device named {0:?}")]
    NotFound(String),
    /// Another session holds it.
    #[error("device {name:?} is in use by session {owner:#x}")]
    Busy {
        /// Device name.
        name: String,
        /// Session holding it.
        owner: u64,
    },
}

/// The served devices.
pub struct Registry {
    slots: Mutex<Vec<Slot>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("devices", &self.list().len())
            .finish()
    }
}

impl Registry {
    /// A registry serving `devices`; names must be unique.
    pub fn new(devices: Vec<Box<dyn Device>>) -> Result<Arc<Self>, String> {
        let mut slots: Vec<Slot> = Vec::new();
        for d in devices {
            let info = d.info().clone();
            if slots.iter().any(|s| s.info.name == info.name) {
                return Err(format!("two devices are named {:?}", info.name));
            }
            slots.push(Slot {
                info,
                device: Some(d),
                owner: None,
                release: Release::default(),
                announced: false,
            });
        }
        Ok(Arc::new(Self {
            slots: Mutex::new(slots),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One summary per device.
    pub fn list(&self) -> Vec<DeviceSummary> {
        self.lock()
            .iter()
            .map(|s| DeviceSummary {
                name: s.info.name.clone(),
                vendor: s.info.vendor,
                device: s.info.device,
                class: s.info.class,
                busy: s.owner.is_some(),
            })
            .collect()
    }

    /// Sets what releasing device `name` does when it cannot be reset to
    /// its power-on state.
    pub fn set_release(&self, name: &str, release: Release) -> Result<(), String> {
        let mut slots = self.lock();
        let slot = slots
            .iter_mut()
            .find(|s| s.info.name == name)
            .ok_or_else(|| format!("no device named {name:?}"))?;
        slot.release = release;
        Ok(())
    }

    /// Number of devices currently open.
    pub fn open_count(&self) -> usize {
        self.lock().iter().filter(|s| s.owner.is_some()).count()
    }

    /// Takes device `name` for `session`.
    pub fn open(self: &Arc<Self>, name: &str, session: u64) -> Result<Lease, OpenError> {
        let mut slots = self.lock();
        let (index, slot) = slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.info.name == name)
            .ok_or_else(|| OpenError::NotFound(name.to_owned()))?;
        match (slot.owner, slot.device.take()) {
            (None, Some(device)) => {
                slot.owner = Some(session);
                Ok(Lease {
                    registry: Arc::clone(self),
                    index,
                    device: Some(device),
                })
            }
            (owner, device) => {
                slot.device = device;
                Err(OpenError::Busy {
                    name: name.to_owned(),
                    owner: owner.unwrap_or(0),
                })
            }
        }
    }
}

/// Exclusive use of one device; gives it back when dropped.
pub struct Lease {
    registry: Arc<Registry>,
    index: usize,
    device: Option<Box<dyn Device>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("index", &self.index).finish()
    }
}

impl Lease {
    /// The leased device.
    pub fn device(&mut self) -> &mut dyn Device {
        self.device.as_deref_mut().expect("present until drop")
    }

    /// The device's release policy, and whether this is the first time it
    /// is asked for (so that it is logged once per device, not per release).
    pub fn release_policy(&self) -> (Release, bool) {
        let mut slots = self.registry.lock();
        let slot = &mut slots[self.index];
        let first = !slot.announced;
        slot.announced = true;
        (slot.release, first)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut slots = self.registry.lock();
        let slot = &mut slots[self.index];
        slot.device = self.device.take();
        slot.owner = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Edu;

    #[test]
    fn one_owner_at_a_time_and_drop_returns_the_device() {
        let r = Registry::new(vec![Box::new(Edu::new("edu0"))]).unwrap();
        let lease = r.open("edu0", 1).unwrap();
        assert!(r.list()[0].busy);
        assert!(matches!(
            r.open("edu0", 2),
            Err(OpenError::Busy { owner: 1, .. })
        ));
        assert!(matches!(r.open("nope", 2), Err(OpenError::NotFound(_))));
        drop(lease);
        assert!(!r.list()[0].busy);
        assert!(r.open("edu0", 2).is_ok());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let e = Registry::new(vec![Box::new(Edu::new("a")), Box::new(Edu::new("a"))]).unwrap_err();
        assert!(e.contains("two devices"));
    }
}
