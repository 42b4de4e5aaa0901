//! The exported devices: channels by id, as configured at start and added and removed
//! at run time.
//!
//! Channel ids count up from 1 and are never given out twice in the life of the
//! relay, so a message of the device VM about a removed channel can never be taken
//! for a newer one. A removed channel stays *retiring* until the device VM
//! acknowledges its CHANNEL_DOWN (or a deadline passes, or the device VM goes): until
//! then it may still use the windows of the channel's last client.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::access::Access;
use crate::channel::Channel;
use crate::config::{DeviceConfig, MAX_DEVICES};
use crate::control::CommandError;

/// Channels by id.
#[derive(Debug)]
pub struct ChannelTable {
    active: BTreeMap<u32, Arc<Channel>>,
    /// Removed channels whose CHANNEL_DOWN the device VM has not acknowledged, with
    /// the time the relay stops waiting.
    retiring: BTreeMap<u32, (Arc<Channel>, Instant)>,
    next_id: u32,
}

impl Default for ChannelTable {
    fn default() -> Self {
        Self {
            active: BTreeMap::new(),
            retiring: BTreeMap::new(),
            next_id: 1,
        }
    }
}

impl ChannelTable {
    /// The channel `id`, exported or retiring.
    pub fn get(&self, id: u32) -> Option<&Arc<Channel>> {
        self.active
            .get(&id)
            .or_else(|| self.retiring.get(&id).map(|(ch, _)| ch))
    }

    /// The exported channels, by id.
    pub fn active(&self) -> impl Iterator<Item = &Arc<Channel>> {
        self.active.values()
    }

    /// Every channel the device VM may know: exported and retiring.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Channel>> {
        self.active
            .values()
            .chain(self.retiring.values().map(|(ch, _)| ch))
    }

    /// Whether `device` could be added: valid on its own, a name and a socket path no
    /// exported device has, none of the `reserved` paths, and room for one more.
    pub fn check_add(&self, device: &DeviceConfig, reserved: &[&Path]) -> Result<(), CommandError> {
        device
            .check()
            .map_err(|reason| CommandError::InvalidDevice { reason })?;
        if self.active.values().any(|ch| ch.name == device.name) {
            return Err(CommandError::DuplicateName {
                name: device.name.clone(),
            });
        }
        let socket = device.socket.as_path();
        if reserved.contains(&socket) || self.active.values().any(|ch| ch.socket == socket) {
            return Err(CommandError::DuplicateSocket {
                socket: socket.display().to_string(),
            });
        }
        if self.active.len() >= MAX_DEVICES {
            return Err(CommandError::TooManyDevices { max: MAX_DEVICES });
        }
        if self.next_id == u32::MAX {
            return Err(CommandError::IdsExhausted);
        }
        Ok(())
    }

    /// Adds `device`, whose socket has `access`, under a fresh channel id, after
    /// [`ChannelTable::check_add`].
    pub fn insert(
        &mut self,
        device: DeviceConfig,
        access: Access,
        reserved: &[&Path],
    ) -> Result<Arc<Channel>, CommandError> {
        self.check_add(&device, reserved)?;
        let id = self.next_id;
        self.next_id += 1;
        let ch = Arc::new(Channel::new(id, device.name, device.socket, access));
        self.active.insert(id, ch.clone());
        Ok(ch)
    }

    /// Takes channel `id` out of the exported ones.
    pub fn remove(&mut self, id: u32) -> Option<Arc<Channel>> {
        self.active.remove(&id)
    }

    /// Keeps the removed channel `ch` until the device VM acknowledges its
    /// CHANNEL_DOWN, or `deadline`.
    pub fn retire(&mut self, ch: Arc<Channel>, deadline: Instant) {
        self.retiring.insert(ch.id, (ch, deadline));
    }

    /// The device VM acknowledged channel `id`'s CHANNEL_DOWN.
    pub fn forget_retiring(&mut self, id: u32) -> Option<Arc<Channel>> {
        self.retiring.remove(&id).map(|(ch, _)| ch)
    }

    /// Every retiring channel (the device VM that knew them is gone).
    pub fn take_retiring(&mut self) -> Vec<Arc<Channel>> {
        std::mem::take(&mut self.retiring)
            .into_values()
            .map(|(ch, _)| ch)
            .collect()
    }

    /// The retiring channels whose deadline is past, taken out.
    pub fn take_expired(&mut self, now: Instant) -> Vec<Arc<Channel>> {
        let ids: Vec<u32> = self
            .retiring
            .iter()
            .filter(|(_, (_, deadline))| *deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.forget_retiring(id))
            .collect()
    }

    /// The earliest deadline of a retiring channel.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.retiring.values().map(|(_, d)| *d).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn dev(name: &str, socket: &str) -> DeviceConfig {
        DeviceConfig {
            name: name.into(),
            socket: socket.into(),
            ..DeviceConfig::default()
        }
    }

    /// Ids count up and are never reused, whether the channel was dropped, is retiring
    /// or was forgotten; a retiring channel is still found by id but not by name or
    /// socket, so both can be taken again at once.
    #[test]
    fn ids_are_never_reused() {
        let mut t = ChannelTable::default();
        let a = t.insert(dev("a", "/a"), Access::default(), &[]).unwrap();
        let b = t.insert(dev("b", "/b"), Access::default(), &[]).unwrap();
        assert_eq!((a.id, b.id), (1, 2));
        let b = t.remove(2).unwrap();
        t.retire(b, Instant::now() + Duration::from_secs(1));
        assert_eq!(t.get(2).unwrap().name, "b");
        assert_eq!(t.active().count(), 1);
        assert_eq!(t.all().count(), 2);
        let b2 = t.insert(dev("b", "/b"), Access::default(), &[]).unwrap();
        assert_eq!(b2.id, 3);
        assert!(t.forget_retiring(2).is_some());
        assert!(t.get(2).is_none());
        t.remove(3);
        assert_eq!(
            t.insert(dev("c", "/c"), Access::default(), &[]).unwrap().id,
            4
        );
    }

    /// Duplicate names and sockets, reserved paths, invalid names and a full table are
    /// refused with the matching error, and change nothing.
    #[test]
    fn refusals() {
        let mut t = ChannelTable::default();
        t.insert(dev("a", "/a"), Access::default(), &[]).unwrap();
        let reserved = [Path::new("/frontend")];
        assert_eq!(
            t.check_add(&dev("a", "/x"), &reserved),
            Err(CommandError::DuplicateName { name: "a".into() })
        );
        assert_eq!(
            t.check_add(&dev("x", "/a"), &reserved),
            Err(CommandError::DuplicateSocket {
                socket: "/a".into()
            })
        );
        assert!(matches!(
            t.check_add(&dev("x", "/frontend"), &reserved),
            Err(CommandError::DuplicateSocket { .. })
        ));
        for bad in ["", "a=b", "a\0b", &"x".repeat(65)] {
            assert!(matches!(
                t.check_add(&dev(bad, "/y"), &reserved),
                Err(CommandError::InvalidDevice { .. })
            ));
        }
        for i in 1..MAX_DEVICES {
            t.insert(
                dev(&format!("d{i}"), &format!("/d{i}")),
                Access::default(),
                &[],
            )
            .unwrap();
        }
        assert_eq!(
            t.insert(dev("one-more", "/one-more"), Access::default(), &[])
                .unwrap_err(),
            CommandError::TooManyDevices { max: MAX_DEVICES }
        );
        assert_eq!(t.active().count(), MAX_DEVICES);
    }

    /// Retiring channels come out when their deadline passes, earliest first known.
    #[test]
    fn retiring_deadlines() {
        let mut t = ChannelTable::default();
        let now = Instant::now();
        for (i, name) in ["a", "b"].iter().enumerate() {
            let ch = t
                .insert(dev(name, &format!("/{name}")), Access::default(), &[])
                .unwrap();
            let ch = t.remove(ch.id).unwrap();
            t.retire(ch, now + Duration::from_secs(i as u64 + 1));
        }
        assert_eq!(t.next_deadline(), Some(now + Duration::from_secs(1)));
        assert!(t.take_expired(now).is_empty());
        let gone = t.take_expired(now + Duration::from_secs(1));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].name, "a");
        assert_eq!(t.take_retiring().len(), 1);
        assert_eq!(t.next_deadline(), None);
    }
}
