//! Linking devices: pairing by a short code (host or joiner), the linked devices, unpairing.

use std::sync::{Arc, Mutex};

use devicelink::pairing::{HostEvent, Paired, PairingCode};
use devicelink::PeerId;
use tokio::sync::broadcast;

use crate::agent::{Agent, Shared};
use crate::error::DeviceLinkError;

/// A device this one was just linked with.
#[derive(Debug, Clone, uniffi::Record)]
pub struct PairedDevice {
    pub device_id: String,
    pub name: String,
    /// Six digits both devices show: the user compares them.
    pub verification: String,
}

impl From<Paired> for PairedDevice {
    fn from(p: Paired) -> Self {
        Self {
            device_id: p.device_id,
            name: p.name,
            verification: p.verification,
        }
    }
}

/// A device of the user's group.
#[derive(Debug, Clone, uniffi::Record)]
pub struct LinkedDevice {
    pub device_id: String,
    pub name: String,
    /// Whether the two devices are connected and syncing now.
    pub connected: bool,
}

/// An open pairing code: show `code()`, then `wait()` for the other device to enter it.
#[derive(uniffi::Object)]
pub struct PairHost {
    shared: Arc<Shared>,
    code: String,
    events: Mutex<broadcast::Receiver<HostEvent>>,
}

#[uniffi::export]
impl PairHost {
    /// The code to type on the other device, like `42-815-067`.
    pub fn code(&self) -> String {
        self.code.clone()
    }

    /// Waits until a device has paired with the code; fails when the code expires or was
    /// burned by wrong guesses (nothing is linked then).
    pub fn wait(&self) -> Result<PairedDevice, DeviceLinkError> {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        self.shared.block_on(async {
            loop {
                match events.recv().await {
                    Ok(HostEvent::Paired(paired)) => return Ok(paired.into()),
                    Ok(HostEvent::AttemptFailed { .. }) => continue,
                    Ok(HostEvent::Closed { reason }) => {
                        return Err(DeviceLinkError::Pairing(format!(
                            "the pairing code closed: {reason}"
                        )))
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(DeviceLinkError::Pairing(
                            "the pairing code closed (the agent paused or stopped)".into(),
                        ))
                    }
                }
            }
        })
    }
}

fn parse_device(device_id: &str) -> Result<PeerId, DeviceLinkError> {
    device_id.trim().parse().map_err(|_| {
        DeviceLinkError::InvalidArgument(format!(
            "{device_id:?} is not a device id (devices() lists them)"
        ))
    })
}

#[uniffi::export]
impl Agent {
    /// Opens a pairing code for `expires_secs` seconds (it is announced over mDNS while open).
    pub fn pair_open(&self, expires_secs: u64) -> Result<Arc<PairHost>, DeviceLinkError> {
        if expires_secs == 0 || expires_secs > 3600 {
            return Err(DeviceLinkError::InvalidArgument(format!(
                "expires_secs is {expires_secs}: give 1 to 3600 seconds"
            )));
        }
        let handle = self.shared.current()?;
        let expiry = std::time::Duration::from_secs(expires_secs);
        let (code, events) = self.shared.block_on(handle.devices().pair_open(expiry))?;
        Ok(Arc::new(PairHost {
            shared: self.shared.clone(),
            code: code.to_string(),
            events: Mutex::new(events),
        }))
    }

    /// Pairs with the device showing `code`: found on the LAN over mDNS, or dialed at
    /// `peer_addr` (a multiaddr like `/ip4/192.0.2.7/tcp/4001`) when given.
    pub fn pair_join(
        &self,
        code: String,
        peer_addr: Option<String>,
    ) -> Result<PairedDevice, DeviceLinkError> {
        let code: PairingCode = code
            .parse()
            .map_err(|e| DeviceLinkError::InvalidArgument(format!("{e}")))?;
        let addr = peer_addr
            .as_deref()
            .map(devicelink::args::parse_multiaddr)
            .transpose()
            .map_err(DeviceLinkError::InvalidArgument)?;
        let handle = self.shared.current()?;
        let paired = self
            .shared
            .block_on(handle.devices().pair_join(&code, addr))?;
        Ok(paired.into())
    }

    /// The devices linked with this one.
    pub fn devices(&self) -> Result<Vec<LinkedDevice>, DeviceLinkError> {
        let handle = self.shared.current()?;
        Ok(handle
            .devices()
            .trusted()?
            .into_iter()
            .map(|(id, device)| LinkedDevice {
                device_id: id.to_string(),
                name: device.name,
                connected: handle.is_syncing_with(&id),
            })
            .collect())
    }

    /// Removes a device from the group on every device: it is disconnected and refused from
    /// now on. Returns whether it was linked.
    pub fn unpair(&self, device_id: String) -> Result<bool, DeviceLinkError> {
        let device = parse_device(&device_id)?;
        let handle = self.shared.current()?;
        Ok(self.shared.block_on(handle.devices().unpair(&device))?)
    }
}
