//! The driver queue against rust-vmm's device-side `virtio_queue::Queue`, the
//! implementation vfu-relay runs, over one memfd mapped twice (as the loopback VMM and
//! the relay map guest memory).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use super::*;

const MEM: usize = 1 << 20;

struct Fixture {
    _file: File,
    driver_map: *mut u8,
    shared: SharedMemory,
    device_mem: GuestMemoryMmap,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping created in `fixture`, no longer used.
        unsafe { libc::munmap(self.driver_map as *mut libc::c_void, MEM) };
    }
}

fn fixture() -> Fixture {
    // SAFETY: memfd_create with a valid C string.
    let fd = unsafe { libc::memfd_create(c"vq-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is new and owned here.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM as u64).unwrap();
    // SAFETY: a fresh shared mapping of the whole memfd.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    // SAFETY: the mapping lives until Fixture drops, after `shared`.
    let shared = unsafe { SharedMemory::new(&[(ptr as *mut u8, MEM, 0)]) };
    let device_mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    Fixture {
        _file: file,
        driver_map: ptr as *mut u8,
        shared,
        device_mem,
    }
}

fn device_queue(q: &DriverQueue, event_idx: bool) -> Queue {
    let mut dq = Queue::new(q.size()).unwrap();
    let (d, a, u) = q.addresses();
    dq.set_desc_table_address(Some(d as u32), Some((d >> 32) as u32));
    dq.set_avail_ring_address(Some(a as u32), Some((a >> 32) as u32));
    dq.set_used_ring_address(Some(u as u32), Some((u >> 32) as u32));
    dq.set_event_idx(event_idx);
    dq.set_ready(true);
    dq
}

/// Chains of readable and writable buffers go through the device queue intact: the
/// device reads what the driver wrote, writes its answer, and the driver gets each head
/// back with the written length, in order; descriptors are recycled.
#[test]
fn chains_round_trip_through_device_queue() {
    let f = fixture();
    let mut q = DriverQueue::new(&f.shared, 8, false).unwrap();
    let mut dq = device_queue(&q, false);
    for round in 0..5u8 {
        let out = f.shared.alloc(64, 8).unwrap();
        out.slice(0, 4).unwrap().copy_from(&[round, 1, 2, 3]);
        let inb = f.shared.alloc(64, 8).unwrap();
        let head = q
            .add(&[
                Segment {
                    gpa: out.gpa,
                    len: 4,
                    device_writable: false,
                },
                Segment {
                    gpa: inb.gpa,
                    len: 64,
                    device_writable: true,
                },
            ])
            .unwrap();
        assert!(q.kick_needed());
        let chain = dq
            .iter(&f.device_mem)
            .unwrap()
            .next()
            .expect("device sees the chain");
        let descs: Vec<_> = chain.clone().collect();
        assert_eq!(descs.len(), 2);
        let mut got = [0u8; 4];
        f.device_mem.read_slice(&mut got, descs[0].addr()).unwrap();
        assert_eq!(got, [round, 1, 2, 3]);
        assert!(descs[1].is_write_only());
        f.device_mem
            .write_slice(&[9, round], descs[1].addr())
            .unwrap();
        dq.add_used(&f.device_mem, chain.head_index(), 2).unwrap();
        let used = q.pop_used().unwrap().unwrap();
        assert_eq!(used, UsedElem { head, len: 2 });
        let mut back = [0u8; 2];
        inb.slice(0, 2).unwrap().copy_to(&mut back);
        assert_eq!(back, [9, round]);
        assert_eq!(q.num_free(), 8);
    }
}

/// A full queue refuses more chains; freeing one makes room.
#[test]
fn full_queue_and_recycling() {
    let f = fixture();
    let mut q = DriverQueue::new(&f.shared, 4, false).unwrap();
    let buf = f.shared.alloc(16, 8).unwrap();
    let seg = Segment {
        gpa: buf.gpa,
        len: 16,
        device_writable: true,
    };
    for _ in 0..4 {
        q.add(&[seg]).unwrap();
    }
    assert!(matches!(q.add(&[seg]), Err(QueueError::Full { .. })));
    let mut dq = device_queue(&q, false);
    let head = dq.iter(&f.device_mem).unwrap().next().unwrap().head_index();
    dq.add_used(&f.device_mem, head, 0).unwrap();
    assert!(q.pop_used().unwrap().is_some());
    q.add(&[seg]).unwrap();
}

/// With EVENT_IDX the driver kicks only when the device's avail_event asks for it, and
/// the device interrupts only when the driver's used_event asks for it.
/// An 8-entry driver queue with EVENT_IDX, the device's view of it, and a 16-byte
/// device-writable buffer to post.
fn event_idx_pair(f: &Fixture) -> (DriverQueue, Queue, Segment) {
    let q = DriverQueue::new(&f.shared, 8, true).unwrap();
    let dq = device_queue(&q, true);
    let buf = f.shared.alloc(16, 8).unwrap();
    let seg = Segment {
        gpa: buf.gpa,
        len: 16,
        device_writable: true,
    };
    (q, dq, seg)
}

#[test]
fn event_idx_suppression() {
    let f = fixture();
    let (mut q, mut dq, seg) = event_idx_pair(&f);
    // Device has avail_event 0: the first add needs a kick.
    q.add(&[seg]).unwrap();
    assert!(q.kick_needed());
    // Device consumes it and sets avail_event (enable_notification writes it).
    let head = dq.iter(&f.device_mem).unwrap().next().unwrap().head_index();
    dq.enable_notification(&f.device_mem).unwrap();
    // A second add passes avail_event = 1: kick.
    q.add(&[seg]).unwrap();
    assert!(q.kick_needed());
    // Without the device re-arming, a third add does not need a kick.
    q.add(&[seg]).unwrap();
    assert!(!q.kick_needed());
    // Used side: driver asks for an interrupt at the next used element.
    assert!(!q.enable_interrupts());
    dq.add_used(&f.device_mem, head, 0).unwrap();
    assert!(dq.needs_notification(&f.device_mem).unwrap());
}

/// With interrupts off (poll mode), rust-vmm's device queue never asks to notify: not
/// even when the polling driver has taken an element before the device decided about
/// it (the device adds, the driver pops and re-disables, only then does the device
/// look at `used_event`). That race made the relay notify a polling driver on nearly
/// every message when `used_event` was set to `last_used - 1`.
#[test]
fn disabled_interrupts_hold_when_the_driver_is_ahead() {
    let f = fixture();
    let (mut q, mut dq, seg) = event_idx_pair(&f);
    q.disable_interrupts();
    for round in 0..20 {
        q.add(&[seg]).unwrap();
        let head = dq.iter(&f.device_mem).unwrap().next().unwrap().head_index();
        dq.add_used(&f.device_mem, head, 0).unwrap();
        // The driver polls: takes the element and disables again, first.
        assert!(q.pop_used().unwrap().is_some());
        q.disable_interrupts();
        assert!(
            !dq.needs_notification(&f.device_mem).unwrap(),
            "round {round}: notified a driver that disabled interrupts"
        );
    }
}

/// A used element for a head that is not in flight, or claiming more bytes than the
/// chain can hold, is refused without touching the free list.
#[test]
fn bad_used_elements_are_refused() {
    let f = fixture();
    let mut q = DriverQueue::new(&f.shared, 4, false).unwrap();
    let buf = f.shared.alloc(16, 8).unwrap();
    q.add(&[Segment {
        gpa: buf.gpa,
        len: 16,
        device_writable: true,
    }])
    .unwrap();
    let (_, _, used) = q.addresses();
    // Device (misbehaving) writes a used element with id 3 (not in flight) and bumps idx.
    f.device_mem
        .write_obj(3u32, GuestAddress(used + 4))
        .unwrap();
    f.device_mem
        .write_obj(0u32, GuestAddress(used + 8))
        .unwrap();
    f.device_mem
        .write_obj(1u16, GuestAddress(used + 2))
        .unwrap();
    assert!(matches!(
        q.pop_used(),
        Err(QueueError::BadUsed { id: 3, .. })
    ));
    // Now id 0 with a length beyond the 16 writable bytes.
    f.device_mem
        .write_obj(0u32, GuestAddress(used + 4))
        .unwrap();
    f.device_mem
        .write_obj(17u32, GuestAddress(used + 8))
        .unwrap();
    assert!(matches!(
        q.pop_used(),
        Err(QueueError::BadUsed { id: 0, len: 17 })
    ));
    assert_eq!(q.num_free(), 3);
}

/// need_event follows the spec's formula, including wrap-around.
#[test]
fn need_event_formula() {
    assert!(need_event(0, 1, 0));
    assert!(!need_event(5, 3, 2));
    assert!(need_event(0xffff, 0, 0xfffe));
    assert!(!need_event(1, 0, 0xffff));
}

/// An edited chain reaches the device as edited (here: its descriptor links to
/// itself and is device-writable), while the driver's own bookkeeping follows the
/// descriptors it took: the head comes back as usual, with the writable length as
/// published, and the free list is whole again. The index helpers publish what they
/// are given: a head nobody set up, an index the device must refuse.
#[test]
fn edited_chains_and_index_abuse() {
    let f = fixture();
    let mut q = DriverQueue::new(&f.shared, 8, false).unwrap();
    let mut dq = device_queue(&q, false);
    let buf = f.shared.alloc(64, 8).unwrap();
    let seg = Segment {
        gpa: buf.gpa,
        len: 32,
        device_writable: false,
    };
    let head = q
        .add_with(&[seg], |d, at| {
            d[0].flags |= VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE;
            d[0].next = at[0];
        })
        .unwrap();
    let chain = dq.iter(&f.device_mem).unwrap().next().unwrap();
    let descs: Vec<_> = chain.clone().collect();
    assert_eq!(descs.len(), 8, "the device walks the loop until its bound");
    assert!(descs.iter().all(|d| d.is_write_only() && d.has_next()));
    dq.add_used(&f.device_mem, chain.head_index(), 32).unwrap();
    assert_eq!(q.pop_used().unwrap(), Some(UsedElem { head, len: 32 }));
    assert_eq!(q.num_free(), 8);

    q.publish_head(11);
    let chain = dq.iter(&f.device_mem).unwrap().next().unwrap();
    assert_eq!(chain.head_index(), 11);
    assert_eq!(chain.count(), 0, "no descriptor behind a head out of range");
    let idx = q.avail_idx();
    q.publish_avail_idx(idx.wrapping_add(9));
    assert!(
        dq.iter(&f.device_mem).is_err(),
        "an index 9 ahead of 8 entries"
    );
    assert_eq!(q.avail_idx(), idx, "the driver's own count is unchanged");
}
