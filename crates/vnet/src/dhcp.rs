//! The static DHCP responder of one bridge: it answers DISCOVER and REQUEST from the MACs it was
//! given a lease for (this host's guests on that bridge), with the address, netmask, gateway,
//! name servers and MTU of the lease, and stays silent for every other MAC (other hosts'
//! responders answer theirs; a site's own DHCP server must leave vgrid's range alone). It
//! holds no pool: what it answers is what the coordinator allocated (Neutron's
//! `--dhcp-range=…,static`, in process).
//!
//! It reads and writes whole Ethernet frames on a packet socket bound to the bridge, so the
//! host needs no address on the site network.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tokio::io::unix::AsyncFd;
use vgrid_api::net::{MacAddr, SiteNet};

use crate::NetError;

/// Seconds a lease is given for: long (the address is the VM's until `vm rm`); a guest renews
/// at half of it.
pub const LEASE_SECONDS: u32 = 86_400;

const ETH_P_IP: u16 = 0x0800;

/// One guest interface's lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub mac: MacAddr,
    pub address: Ipv4Addr,
    pub net: SiteNet,
}

impl Lease {
    /// The address the responder answers from: the network's gateway, else its first address.
    fn server(&self) -> Ipv4Addr {
        self.net.gateway.unwrap_or_else(|| Ipv4Addr::from(u32::from(self.net.cidr.network()) + 1))
    }
}

type Leases = Arc<Mutex<HashMap<MacAddr, Lease>>>;

/// A running responder on one bridge; stops when dropped.
pub struct Responder {
    bridge: String,
    leases: Leases,
    task: tokio::task::JoinHandle<()>,
}

impl Responder {
    /// Starts answering on `bridge` (a tokio runtime must be running).
    pub fn start(bridge: &str) -> Result<Responder, NetError> {
        let sock = PacketSocket::bind(bridge)?;
        let leases: Leases = Arc::default();
        let (b, l) = (bridge.to_string(), leases.clone());
        let task = tokio::spawn(async move { serve(sock, b, l).await });
        Ok(Responder { bridge: bridge.to_string(), leases, task })
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// Answers `lease.mac` with `lease` from now on.
    pub fn set(&self, lease: Lease) {
        tracing::info!(bridge = %self.bridge, mac = %lease.mac, address = %lease.address, "DHCP lease served");
        self.leases.lock().unwrap().insert(lease.mac, lease);
    }

    /// The lease `mac` is answered with, if any.
    pub fn lease(&self, mac: MacAddr) -> Option<Lease> {
        self.leases.lock().unwrap().get(&mac).cloned()
    }

    /// Stops answering `mac`.
    pub fn remove(&self, mac: MacAddr) {
        self.leases.lock().unwrap().remove(&mac);
    }

    /// How many MACs it answers.
    pub fn len(&self) -> usize {
        self.leases.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An `AF_PACKET` socket of IPv4 frames on one interface.
struct PacketSocket {
    fd: AsyncFd<OwnedFd>,
    mac: [u8; 6],
}

impl PacketSocket {
    fn bind(bridge: &str) -> Result<PacketSocket, NetError> {
        let err = |what, source| NetError::Socket { bridge: bridge.to_string(), what, source };
        let index = crate::link::index(bridge)?;
        let mac = crate::link::mac(bridge)?;
        // SAFETY: plain socket calls on a descriptor this function owns.
        let fd = unsafe {
            libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, i32::from(ETH_P_IP.to_be()))
        };
        if fd < 0 {
            return Err(err("opening a packet socket (needs root or CAP_NET_RAW)", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set are those bind reads.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_IP.to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` lives across the call and its size is passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(err("binding the packet socket", std::io::Error::last_os_error()));
        }
        // SAFETY: the descriptor is owned by the AsyncFd from here on, never replaced or
        // closed while it is registered.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| err("registering the socket", e.into()))?;
        Ok(PacketSocket { fd, mac })
    }

    async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            // SAFETY: `buf` is valid for `buf.len()` bytes.
            let r = guard.try_io(|fd| {
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            if let Ok(r) = r {
                return r;
            }
        }
    }

    fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        // SAFETY: `frame` is valid for its length; the socket is bound to one interface.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

async fn serve(sock: PacketSocket, bridge: String, leases: Leases) {
    let mut buf = vec![0u8; 2048];
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(bridge = %bridge, "DHCP responder: receive failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                continue;
            }
        };
        let Some(request) = dhcp_payload(&buf[..n]) else { continue };
        let Ok(msg) = Message::decode(&mut Decoder::new(request)) else { continue };
        let Some(mac) = client_mac(&msg) else { continue };
        let lease = leases.lock().unwrap().get(&mac).cloned();
        let Some(lease) = lease else { continue };
        let Some(reply) = answer(&msg, &lease) else { continue };
        let frame = frame_of(&reply, &lease, sock.mac, &msg);
        match sock.send(&frame) {
            Ok(()) => tracing::debug!(bridge = %bridge, mac = %mac, address = %lease.address, "DHCP answered"),
            Err(e) => tracing::warn!(bridge = %bridge, mac = %mac, "DHCP reply not sent: {e}"),
        }
    }
}

/// The DHCP message of an Ethernet frame carrying IPv4/UDP to port 67.
fn dhcp_payload(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < 14 + 20 + 8 || u16::from_be_bytes([frame[12], frame[13]]) != ETH_P_IP {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip[9] != 17 || ip.len() < ihl + 8 {
        return None;
    }
    let udp = &ip[ihl..];
    if u16::from_be_bytes([udp[2], udp[3]]) != 67 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]])).clamp(8, udp.len());
    Some(&udp[8..len])
}

fn client_mac(msg: &Message) -> Option<MacAddr> {
    let c = msg.chaddr();
    (msg.opcode() == Opcode::BootRequest && c.len() >= 6).then(|| MacAddr([c[0], c[1], c[2], c[3], c[4], c[5]]))
}

/// The answer to `msg` from a client holding `lease`: OFFER to DISCOVER, ACK to a REQUEST for
/// its address (or NAK to one for another), nothing to the rest.
fn answer(msg: &Message, lease: &Lease) -> Option<Message> {
    let kind = match msg.opts().msg_type()? {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            let asked = match msg.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(a)) => Some(*a),
                _ => Some(msg.ciaddr()).filter(|a| !a.is_unspecified()),
            };
            if asked.is_some_and(|a| a != lease.address) {
                MessageType::Nak
            } else {
                MessageType::Ack
            }
        }
        _ => return None,
    };
    let server = lease.server();
    let yiaddr = if kind == MessageType::Nak { Ipv4Addr::UNSPECIFIED } else { lease.address };
    let mut r = Message::new(Ipv4Addr::UNSPECIFIED, yiaddr, server, msg.giaddr(), msg.chaddr());
    r.set_opcode(Opcode::BootReply).set_xid(msg.xid()).set_flags(msg.flags());
    let o = r.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(server));
    if kind != MessageType::Nak {
        o.insert(DhcpOption::AddressLeaseTime(LEASE_SECONDS));
        o.insert(DhcpOption::SubnetMask(lease.net.cidr.netmask()));
        o.insert(DhcpOption::BroadcastAddr(lease.net.cidr.broadcast()));
        if let Some(g) = lease.net.gateway {
            o.insert(DhcpOption::Router(vec![g]));
        }
        if !lease.net.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(lease.net.dns.clone()));
        }
        if let Some(m) = lease.net.mtu {
            o.insert(DhcpOption::InterfaceMtu(m));
        }
    }
    Some(r)
}

/// The Ethernet frame carrying `reply` to the client: to its MAC, from the bridge's; IPv4 from
/// the server address to the leased one (to 255.255.255.255 when the client asked for a
/// broadcast, or for a NAK); UDP 67 → 68.
fn frame_of(reply: &Message, lease: &Lease, bridge_mac: [u8; 6], request: &Message) -> Vec<u8> {
    let mut dhcp = Vec::with_capacity(576);
    let _ = reply.encode(&mut Encoder::new(&mut dhcp));
    let nak = matches!(reply.opts().msg_type(), Some(MessageType::Nak));
    let broadcast = nak || request.flags().broadcast();
    let dst_ip = if broadcast { Ipv4Addr::BROADCAST } else { lease.address };
    let dst_mac = if broadcast { [0xff; 6] } else { lease.mac.0 };
    let udp_len = 8 + dhcp.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&bridge_mac);
    f.extend_from_slice(&ETH_P_IP.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&lease.server().octets());
    ip[16..20].copy_from_slice(&dst_ip.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&67u16.to_be_bytes());
    f.extend_from_slice(&68u16.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
    f.extend_from_slice(&dhcp);
    f
}

/// The Internet checksum of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            mac: "02:11:0a:14:00:64".parse().unwrap(),
            address: "10.20.0.100".parse().unwrap(),
            net: SiteNet {
                cidr: "10.20.0.0/24".parse().unwrap(),
                range: "10.20.0.100-10.20.0.199".parse().unwrap(),
                gateway: Some("10.20.0.1".parse().unwrap()),
                dns: vec!["10.20.0.1".parse().unwrap()],
                mtu: Some(1400),
            },
        }
    }

    fn request(kind: MessageType, requested: Option<Ipv4Addr>) -> Message {
        let l = lease();
        let mut m = Message::new(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &l.mac.0);
        m.set_opcode(Opcode::BootRequest).set_xid(0x1234);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        if let Some(a) = requested {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(a));
        }
        m
    }

    /// A client's frame as it arrives: Ethernet, IPv4, UDP 68 → 67, DHCP.
    fn client_frame(m: &Message) -> Vec<u8> {
        let mut dhcp = Vec::new();
        m.encode(&mut Encoder::new(&mut dhcp)).unwrap();
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&lease().mac.0);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((28 + dhcp.len()) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[16..20].copy_from_slice(&[255; 4]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&68u16.to_be_bytes());
        f.extend_from_slice(&67u16.to_be_bytes());
        f.extend_from_slice(&((8 + dhcp.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&dhcp);
        f
    }

    #[test]
    fn discover_gets_the_lease_and_its_options() {
        let frame = client_frame(&request(MessageType::Discover, None));
        let msg = Message::decode(&mut Decoder::new(dhcp_payload(&frame).unwrap())).unwrap();
        assert_eq!(client_mac(&msg), Some(lease().mac));
        let offer = answer(&msg, &lease()).unwrap();
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), lease().address);
        assert_eq!(offer.xid(), 0x1234);
        assert_eq!(offer.opts().get(OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask("255.255.255.0".parse().unwrap())));
        assert_eq!(offer.opts().get(OptionCode::Router), Some(&DhcpOption::Router(vec!["10.20.0.1".parse().unwrap()])));
        assert_eq!(offer.opts().get(OptionCode::InterfaceMtu), Some(&DhcpOption::InterfaceMtu(1400)));
        let out = frame_of(&offer, &lease(), [2, 0, 0, 0, 0, 1], &msg);
        // A valid IPv4 header (its checksum sums to zero) to the leased address, UDP 67 -> 68.
        assert_eq!(checksum(&out[14..34]), 0);
        assert_eq!(&out[30..34], &[10, 20, 0, 100]);
        assert_eq!(&out[34..38], &[0, 67, 0, 68]);
        let back = Message::decode(&mut Decoder::new(&out[42..])).unwrap();
        assert_eq!(back.yiaddr(), lease().address);
    }

    #[test]
    fn a_request_for_another_address_is_refused_and_others_ignored() {
        let ack = answer(&request(MessageType::Request, Some("10.20.0.100".parse().unwrap())), &lease()).unwrap();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        let nak = answer(&request(MessageType::Request, Some("10.20.0.150".parse().unwrap())), &lease()).unwrap();
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert!(answer(&request(MessageType::Release, None), &lease()).is_none());
        // Not DHCP: not for the responder.
        let mut f = client_frame(&request(MessageType::Discover, None));
        f[36..38].copy_from_slice(&53u16.to_be_bytes());
        assert!(dhcp_payload(&f).is_none());
        assert!(dhcp_payload(&f[..20]).is_none());
    }
}
