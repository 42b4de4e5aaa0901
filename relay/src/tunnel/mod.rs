//! The tunnel device, relay side: a vhost-user backend on `vhost-user-backend`, the
//! queue-level [`Link`], and the tunnel protocol (`docs/tunnel.md`): HELLO, channels,
//! sessions, replies, interrupts.

mod backend;
pub mod chain;
pub mod direct;
pub mod gate;
mod link;

pub use backend::{ExitEvents, TunnelBackend};
pub(crate) use link::decode;
pub use link::{BadMessage, Incoming, Link, LinkCounts, LinkError, Negotiated, CHANNEL_BUDGET};

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};
use vfu_proto::tunnel::{
    features, Body, Hello, HelloReply, Kind, TunnelError, TunnelMessage, VERSION_MAJOR,
    VERSION_MINOR,
};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::switch::Relay;
use crate::{warn_limited, Error, Result};
use gate::Gate;

/// Features the relay supports today.
const RELAY_FEATURES: u64 = features::WINDOWS | features::DIRECT_DATA | features::POSTED_DONE;

/// Serves one device VM after another on the frontend socket `listener` (created by
/// the caller with its mode and group, once: the relay never binds it again, so it
/// needs no privileges for it later), until the relay stops. Between two device VMs,
/// clients get ENODEV.
///
/// Each connection's peer is checked against the frontend allow-list right after the
/// vhost-user library accepted it ([`gate`]); a refused peer is logged and shut down,
/// and the relay goes back to waiting as if it had never come.
pub fn serve_frontends(relay: Arc<Relay>, listener: UnixListener) -> Result<()> {
    let socket = relay.config.frontend_socket.clone();
    let access = relay.config.frontend_access();
    // The library's accept loop spins on a non-blocking listener.
    listener.set_nonblocking(false)?;
    let listener_fd = listener.as_raw_fd();
    let mut listener = Listener::from(listener);
    crate::service::ready("waiting for the device VM");
    let exits = ExitEvents::default();
    while !relay.is_stopping() {
        // The exit events of the daemon before this one: its workers are gone.
        exits.close_all();
        let gate = Arc::new(Gate::default());
        let generation = relay.link.generation();
        let backend = TunnelBackend::new(relay.clone(), gate.clone(), exits.clone());
        let announcer = backend.clone();
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vfu-tunnel".into(), backend, mem)
            .map_err(|e| Error::Backend(e.to_string()))?;
        info!("waiting for the device VM's VMM on {}", socket.display());
        if let Err(e) = daemon.start(&mut listener) {
            // Out of descriptors, most likely: try again in a while.
            warn!("frontend socket {}: {e}", socket.display());
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let allowed = match gate::accepted_peer(&socket, listener_fd) {
            Ok(cred) if access.allows_now(&cred) => {
                info!("the device VM's VMM connected ({cred})");
                crate::service::status("device VM connected");
                true
            }
            Ok(cred) => {
                warn_limited!(
                    "refused a device VM's VMM on {}: {cred} is not allowed ({})",
                    socket.display(),
                    access.describe()
                );
                false
            }
            Err(e) => {
                warn_limited!(
                    "refused a connection on the frontend socket {}: its credentials cannot be read: {e}",
                    socket.display()
                );
                false
            }
        };
        gate.decide(allowed);
        if !allowed {
            daemon.request_shutdown();
        } else {
            if let Some(handle) = daemon.shutdown_handle() {
                // A device VM that breaks a ring of the tunnel is dropped.
                relay
                    .link
                    .attach_dropper(generation, Box::new(move || handle.shutdown()));
            }
            announcer.announce_vrings(&daemon.get_epoll_handlers());
        }
        let result = daemon.wait();
        // The queue worker threads of this connection end here.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        if !allowed {
            continue; // it reached nothing of the relay
        }
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("device VM disconnected"),
            Err(e) => warn!("device VM connection ended: {e}"),
        }
        device_vm_gone(&relay);
        crate::service::status("device VM disconnected; waiting for it");
    }
    exits.close_all();
    Ok(())
}

/// The device VM went away: requests in flight fail, channels wait for the next HELLO;
/// removed channels are forgotten (the next device VM never knew them).
pub(crate) fn device_vm_gone(relay: &Relay) {
    let mut table = relay.table();
    relay.link.reset();
    relay.windows().detach();
    for ch in table.all() {
        let outcome = ch.fail_pending(relay, libc::ENODEV as u32);
        relay.after_send(ch, outcome);
    }
    table.take_retiring();
}

/// Takes every message the driver has put on the `g2h` queue of `pair` and handles
/// it, in bounded batches (the link lock is released between them, so the switch keeps
/// forwarding requests while a busy driver talks). Called by the queue worker on a
/// notification and by the switch when it polls; one at a time per queue, so that a
/// channel's messages are handled in order.
/// Returns whether it took any.
pub fn drain_g2h(relay: &Relay, pair: usize) -> bool {
    let Some(_held) = relay.link.draining(pair) else {
        return false;
    };
    let mut took = false;
    loop {
        let (messages, more) = relay.link.receive(pair);
        took |= !messages.is_empty();
        crate::channel::batch_client_writes(relay, || {
            for msg in messages {
                dispatch(relay, msg);
            }
        });
        relay.link.signal_pending();
        if !more {
            break;
        }
    }
    took
}

/// Handles one message from the device VM.
pub fn dispatch(relay: &Relay, incoming: Incoming) {
    let msg = match incoming {
        Incoming::Direct(req) => return direct::serve(relay, req),
        Incoming::BadChain(why) => {
            // Logged by the link; the driver hears of it too.
            report(relay, 0, 0, libc::EINVAL as u32, &why);
            return;
        }
        Incoming::Message(m) => m,
    };
    let msg = match msg {
        Ok(m) => m,
        Err(BadMessage {
            header: Some(h),
            error: TunnelError::UnknownKind { kind },
        }) => {
            // The spec's answer to a request of unknown kind.
            warn_limited!("device VM sent unknown kind {kind:#x}; answering ENOSYS");
            send_reply(
                relay,
                h.channel,
                h.tag,
                Body::Status {
                    kind,
                    status: libc::ENOSYS as u32,
                },
            );
            return;
        }
        Err(BadMessage { header, error }) => {
            warn_limited!("malformed message from the device VM: {error}");
            let (channel, tag) = header.map_or((0, 0), |h| (h.channel, h.tag));
            report(relay, channel, tag, error.errno(), &error.to_string());
            return;
        }
    };
    let (channel, tag) = (msg.channel, msg.tag);
    match msg.body {
        Body::Hello(h) => hello(relay, tag, h),
        Body::Status { kind, status } => on_status(relay, channel, tag, kind, status),
        Body::VfioUser(frame) => match relay.channel(channel) {
            Some(ch) => {
                let outcome = ch.on_device_message(relay, frame);
                relay.after_send(&ch, outcome);
            }
            None => no_channel(relay, "a vfio-user message", channel, tag),
        },
        Body::Irq(t) => match relay.channel(channel) {
            Some(ch) => ch.on_irq(t.index, t.start, t.count),
            None => no_channel(relay, "an interrupt", channel, tag),
        },
        Body::PostedDone { msg_id } if relay.link.features() & features::POSTED_DONE != 0 => {
            match relay.channel(channel) {
                Some(ch) => ch.on_posted_done(relay, msg_id),
                None => report(relay, channel, tag, libc::ENOENT as u32, "no such channel"),
            }
        }
        Body::DmaRead { segments } => {
            let segs: Vec<(u64, u64)> = segments.iter().map(|s| (s.iova, s.len)).collect();
            let reply = match relay.channel(channel) {
                Some(ch) => ch.on_dma_read(relay, tag, &segs),
                None => {
                    warn_limited!(
                        "device VM sent a DMA read for channel {channel}, which does not exist"
                    );
                    Some(Body::DmaReadReply {
                        status: libc::ENOENT as u32,
                        data: Vec::new(),
                    })
                }
            };
            if let Some(reply) = reply {
                send_reply(relay, channel, tag, reply);
            }
        }
        Body::DmaWrite { segments, mut data } => {
            let segs: Vec<(u64, u64)> = segments.iter().map(|s| (s.iova, s.len)).collect();
            let status = match relay.channel(channel) {
                Some(ch) => ch.on_dma_write(relay, tag, &segs, &mut data),
                None => {
                    warn_limited!(
                        "device VM sent a DMA write for channel {channel}, which does not exist"
                    );
                    Some(libc::ENOENT as u32)
                }
            };
            if let Some(status) = status {
                send_reply(
                    relay,
                    channel,
                    tag,
                    Body::Status {
                        kind: Kind::DmaWrite as u16,
                        status,
                    },
                );
            }
        }
        Body::Error { errno, text } => {
            warn_limited!("device VM reports error {errno} on channel {channel}: {text}")
        }
        other => {
            let (kind, reply) = other.kind();
            warn_limited!(
                "device VM sent kind {kind:#x} (reply {reply}), which it must not; ignored"
            );
            report(
                relay,
                channel,
                tag,
                libc::EINVAL as u32,
                "unexpected message kind",
            );
        }
    }
}

/// The device VM sent `what` for a channel that does not exist: logged, and answered
/// with ERROR (ENOENT).
fn no_channel(relay: &Relay, what: &str, channel: u32, tag: u32) {
    warn_limited!("device VM sent {what} for channel {channel}, which does not exist");
    report(relay, channel, tag, libc::ENOENT as u32, "no such channel");
}

fn send_reply(relay: &Relay, channel: u32, tag: u32, body: Body) {
    if let Err(e) = relay.link.send(&TunnelMessage { channel, tag, body }) {
        debug!("reply on channel {channel} not sent: {e}");
    }
}

/// Sends an ERROR to the device VM.
fn report(relay: &Relay, channel: u32, tag: u32, errno: u32, text: &str) {
    let mut text = text.to_string();
    text.truncate(vfu_proto::tunnel::MAX_ERROR_TEXT);
    send_reply(relay, channel, tag, Body::Error { errno, text });
}

/// A HELLO: the driver (re)started. What its previous instance had is gone: requests
/// in flight fail (ECONNRESET), windows are unmapped, channels wait to be brought up
/// again, and the channels removed since are forgotten. `table` stays locked.
fn forget_driver_instance(relay: &Relay, table: &mut crate::table::ChannelTable) {
    for ch in table.all() {
        ch.on_driver_restart(relay);
        let outcome = ch.fail_pending(relay, libc::ECONNRESET as u32);
        relay.after_send(ch, outcome);
    }
    table.take_retiring();
}

/// HELLO: negotiate, then bring every exported channel up.
fn hello(relay: &Relay, tag: u32, h: Hello) {
    if h.version_major != VERSION_MAJOR {
        // Whatever it speaks, the driver restarted: its requests in flight are lost.
        forget_driver_instance(relay, &mut relay.table());
        warn!(
            "device VM speaks tunnel version {}.{}, the relay {VERSION_MAJOR}.{VERSION_MINOR}",
            h.version_major, h.version_minor
        );
        // The link is not up, so answer directly through a temporary negotiation.
        relay.link.set_up(Negotiated {
            pairs: 1,
            guest_max_msg: (h.max_msg_size as usize).min(relay.link.max_msg_size),
            features: 0,
        });
        send_reply(
            relay,
            0,
            tag,
            Body::HelloReply(HelloReply {
                status: libc::EPROTONOSUPPORT as u32,
                version_major: VERSION_MAJOR,
                version_minor: VERSION_MINOR,
                queue_pairs: 1,
                max_msg_size: relay.link.max_msg_size as u32,
                features: 0,
                shm_size: 0,
            }),
        );
        relay.link.reset_negotiation();
        return;
    }
    let mut offered = RELAY_FEATURES;
    if !relay.windows().available() {
        offered &= !features::WINDOWS;
    }
    let negotiated = Negotiated {
        pairs: h.queue_pairs.min(relay.link.offered_pairs).max(1),
        guest_max_msg: (h.max_msg_size as usize).min(relay.link.max_msg_size),
        features: h.features & offered & features::ALL,
    };
    let shm_size = if negotiated.features & features::WINDOWS != 0 {
        relay.windows().size()
    } else {
        0
    };
    // The table stays locked until every channel is up: a device added meanwhile is
    // brought up once, here or by the add.
    let mut table = relay.table();
    // A HELLO after the first: the driver restarted (the frontend stays connected).
    forget_driver_instance(relay, &mut table);
    relay.link.set_up(negotiated);
    info!(
        "device VM said HELLO: tunnel {}.{}, {} queue pair(s), messages up to {} bytes",
        h.version_major, h.version_minor, negotiated.pairs, negotiated.guest_max_msg
    );
    send_reply(
        relay,
        0,
        tag,
        Body::HelloReply(HelloReply {
            status: 0,
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            queue_pairs: negotiated.pairs,
            max_msg_size: relay.link.max_msg_size as u32,
            features: negotiated.features,
            shm_size,
        }),
    );
    for ch in table.active() {
        ch.bring_up(relay);
    }
}

fn on_status(relay: &Relay, channel: u32, tag: u32, kind: u16, status: u32) {
    let Some(ch) = relay.channel(channel) else {
        warn_limited!("device VM sent a status for unknown channel {channel}");
        return;
    };
    match Kind::from_u16(kind) {
        Some(Kind::ChannelDown) => {
            if status != 0 {
                warn!(
                    "{}: device VM answered CHANNEL_DOWN with errno {status}",
                    ch.name
                );
            }
            relay.on_channel_down_ack(channel);
        }
        Some(Kind::ChannelUp) => ch.on_channel_up_status(relay, tag, status),
        Some(Kind::SessionEnd) => {
            if status != 0 {
                warn!(
                    "{}: device VM answered SESSION_END with errno {status}",
                    ch.name
                );
            }
            ch.on_session_end_ack(relay, tag);
        }
        Some(k) if status != 0 => {
            warn_limited!("{}: device VM answered {k:?} with errno {status}", ch.name)
        }
        Some(_) => {}
        None => warn_limited!("{}: status for unknown kind {kind:#x}", ch.name),
    }
}
