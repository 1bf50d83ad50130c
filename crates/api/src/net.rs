//! A VM's networking: the single home of everything about its network interfaces and the
//! networks they attach to. Three modes ([`Nic`]): user-mode networking (QEMU's slirp, TCP port
//! forwards from the host's 127.0.0.1), a **site** network (a tap on a bridge of the host's LAN,
//! an address the coordinator leases from the network's range, answered by the host's DHCP) and
//! a **tunnel** network (Ethernet frames carried to the user's own LAN by `vgrid tunnel`).
//! The coordinator allocates a site NIC's address and every NIC's MAC at admission and writes
//! them into the VM's configuration: the network identity belongs to the VM record, not to
//! the host it runs on.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What is wrong with a VM's networking; each error names the value and what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NetError {
    #[error("invalid forward {value:?}: expected HOSTPORT:GUESTPORT")]
    ForwardSyntax { value: String },
    #[error("invalid port {port:?} in forward {value:?}: expected 1-65535")]
    ForwardPortText { port: String, value: String },
    #[error("port forward {host}->{guest}: ports must be 1-65535")]
    ForwardPort { host: u16, guest: u16 },
    #[error("host port {port} is forwarded twice")]
    ForwardTwice { port: u16 },
    #[error("invalid network interface {value:?}: expected user, site:NETWORK or tunnel:NETWORK")]
    NicSyntax { value: String },
    #[error("invalid network name {name:?}: 1-32 characters of a-z, 0-9, '-' and '_', starting with a letter")]
    Name { name: String },
    #[error("network {network:?} is attached twice: one interface per network")]
    NicTwice { network: String },
    #[error("a VM has at most {max} network interfaces, not {count}")]
    TooManyNics { count: usize, max: usize },
    #[error("invalid MAC address {value:?}: expected six hex bytes like 02:00:0a:14:00:64")]
    MacSyntax { value: String },
    #[error("MAC address {mac} is not a unicast, locally administered address")]
    MacKind { mac: MacAddr },
    #[error("invalid CIDR {value:?}: expected A.B.C.D/LEN with LEN 8-30 and no host bits set")]
    Cidr { value: String },
    #[error("invalid address range {value:?}: expected FIRST-LAST, both IPv4 addresses")]
    RangeSyntax { value: String },
    #[error("address range {first}-{last} is not inside {cidr} (or is backwards, or holds its network or broadcast address)")]
    RangeOutside { first: Ipv4Addr, last: Ipv4Addr, cidr: Cidr },
    #[error("{what} {addr} is not inside {cidr}")]
    AddrOutside { what: &'static str, addr: Ipv4Addr, cidr: Cidr },
    #[error("gateway {gateway} lies inside the range {first}-{last} that guests are given")]
    GatewayInRange { gateway: Ipv4Addr, first: Ipv4Addr, last: Ipv4Addr },
    #[error("{count} name servers: at most {max}")]
    TooManyDns { count: usize, max: usize },
    #[error("MTU {mtu} is outside 576-9000")]
    Mtu { mtu: u16 },
    #[error("a site network needs --cidr and --range")]
    SiteNeedsRange,
    #[error("interface {nic}: its MAC and address are allocated by the coordinator, not given in a request")]
    Allocated { nic: String },
    #[error("port forwards need a user-mode interface (--net user)")]
    ForwardsNeedUser,
}

/// An IPv4 address as the schemas write it (what `Ipv4Addr` parses: no leading zeros).
pub const IPV4_PATTERN: &str = "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$";

/// The schema of a list of name servers: IPv4 addresses, at most [`MAX_DNS`].
fn ipv4_list() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String).pattern(Some(IPV4_PATTERN))).max_items(Some(MAX_DNS)).build()
}

/// Most name servers a site network tells its guests of.
pub const MAX_DNS: usize = 4;

/// Most network interfaces of one VM.
pub const MAX_NICS: usize = 8;

/// The network interfaces of a VM, in guest order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetConfig {
    pub nics: Vec<Nic>,
}

impl Default for NetConfig {
    /// One user-mode interface without forwards (what every VM had before networks were
    /// configurable).
    fn default() -> Self {
        NetConfig::user(Vec::new())
    }
}

impl NetConfig {
    /// One user-mode interface with these port forwards.
    pub fn user(forwards: Vec<Forward>) -> NetConfig {
        NetConfig { nics: vec![Nic::User { forwards }] }
    }

    /// The interfaces a request asks for: `nics` (none: one user-mode interface), with
    /// `forwards` on the user-mode one. A request names networks only: addresses and MACs are
    /// the coordinator's to choose.
    pub fn requested(nics: &[Nic], forwards: &[Forward]) -> Result<NetConfig, NetError> {
        if nics.is_empty() {
            return Ok(NetConfig::user(forwards.to_vec()));
        }
        let mut out = nics.to_vec();
        for n in &out {
            if n.mac().is_some() || n.address().is_some() {
                return Err(NetError::Allocated { nic: n.to_string() });
            }
        }
        if !forwards.is_empty() {
            match out.iter_mut().find(|n| matches!(n, Nic::User { .. })) {
                Some(Nic::User { forwards: f }) => f.extend_from_slice(forwards),
                _ => return Err(NetError::ForwardsNeedUser),
            }
        }
        Ok(NetConfig { nics: out })
    }

    /// The port forwards of all interfaces.
    pub fn forwards(&self) -> impl Iterator<Item = &Forward> {
        self.nics.iter().flat_map(|n| match n {
            Nic::User { forwards } => forwards.iter(),
            _ => [].iter(),
        })
    }

    /// Whether any interface forwards host port `port`.
    pub fn forwards_host_port(&self, port: u16) -> bool {
        self.forwards().any(|f| f.host == port)
    }

    /// The site and tunnel networks the VM attaches to, in order.
    pub fn networks(&self) -> impl Iterator<Item = &str> {
        self.nics.iter().filter_map(Nic::network)
    }

    /// The site networks the VM attaches to (a host must be attached to each).
    pub fn site_networks(&self) -> impl Iterator<Item = &str> {
        self.nics.iter().filter(|n| matches!(n, Nic::Site { .. })).filter_map(Nic::network)
    }

    /// Static checks: at most [`MAX_NICS`] interfaces, network names well formed and each
    /// attached once, allocated MACs local unicast, every port in 1-65535, no host port
    /// forwarded twice.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.nics.len() > MAX_NICS {
            return Err(NetError::TooManyNics { count: self.nics.len(), max: MAX_NICS });
        }
        let mut nets = std::collections::HashSet::new();
        for n in &self.nics {
            if let Some(net) = n.network() {
                check_network_name(net)?;
                if !nets.insert(net) {
                    return Err(NetError::NicTwice { network: net.to_string() });
                }
            }
            if let Some(mac) = n.mac().filter(|m| !m.is_local_unicast()) {
                return Err(NetError::MacKind { mac });
            }
        }
        let mut seen = std::collections::HashSet::new();
        for f in self.forwards() {
            if f.host == 0 || f.guest == 0 {
                return Err(NetError::ForwardPort { host: f.host, guest: f.guest });
            }
            if !seen.insert(f.host) {
                return Err(NetError::ForwardTwice { port: f.host });
            }
        }
        Ok(())
    }
}

/// One network interface of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Nic {
    /// User-mode networking (QEMU's slirp): outbound connections through the host, and TCP
    /// port forwards from the host's 127.0.0.1.
    User {
        #[serde(default)]
        forwards: Vec<Forward>,
    },
    /// A tap on the bridge through which the host reaches site network `network`; the guest
    /// takes `address` by DHCP from the host. `mac` and `address` are the coordinator's to
    /// allocate (absent in a request).
    Site {
        #[schema(pattern = "^[a-z][a-z0-9_-]{0,31}$")]
        network: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>, pattern = "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
        mac: Option<MacAddr>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>, pattern = "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$")]
        address: Option<Ipv4Addr>,
    },
    /// In the user's tunnel network `network`: frames travel to the user's `vgrid tunnel`; the
    /// guest takes its address from the user's LAN. `mac` is the coordinator's to allocate.
    Tunnel {
        #[schema(pattern = "^[a-z][a-z0-9_-]{0,31}$")]
        network: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schema(value_type = Option<String>, pattern = "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
        mac: Option<MacAddr>,
    },
}

impl Nic {
    /// `user`, `site` or `tunnel`.
    pub fn mode(&self) -> &'static str {
        match self {
            Nic::User { .. } => "user",
            Nic::Site { .. } => "site",
            Nic::Tunnel { .. } => "tunnel",
        }
    }

    /// The network a site or tunnel interface attaches to.
    pub fn network(&self) -> Option<&str> {
        match self {
            Nic::User { .. } => None,
            Nic::Site { network, .. } | Nic::Tunnel { network, .. } => Some(network),
        }
    }

    /// The MAC address allocated to it (none for user mode: QEMU's default).
    pub fn mac(&self) -> Option<MacAddr> {
        match self {
            Nic::User { .. } => None,
            Nic::Site { mac, .. } | Nic::Tunnel { mac, .. } => *mac,
        }
    }

    /// The address leased to it (site mode only; a tunnel's address is the user's LAN's).
    pub fn address(&self) -> Option<Ipv4Addr> {
        match self {
            Nic::Site { address, .. } => *address,
            _ => None,
        }
    }
}

impl std::str::FromStr for Nic {
    type Err = NetError;
    /// `user`, `site:NETWORK` or `tunnel:NETWORK` (what `vm run --net` takes).
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::NicSyntax { value: s.to_string() };
        match s.split_once(':') {
            None if s == "user" => Ok(Nic::User { forwards: Vec::new() }),
            Some(("site", n)) => {
                check_network_name(n)?;
                Ok(Nic::Site { network: n.to_string(), mac: None, address: None })
            }
            Some(("tunnel", n)) => {
                check_network_name(n)?;
                Ok(Nic::Tunnel { network: n.to_string(), mac: None })
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.network() {
            Some(n) => write!(f, "{}:{n}", self.mode()),
            None => f.write_str(self.mode()),
        }
    }
}

/// A network's name: 1-32 of `a-z0-9-_`, starting with a letter (it names bridges and keys).
pub fn check_network_name(name: &str) -> Result<(), NetError> {
    let ok = (1..=32).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(NetError::Name { name: name.to_string() })
    }
}

/// An Ethernet MAC address, written `02:00:0a:14:00:64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A unicast (bit 0 of the first byte clear), locally administered (bit 1 set) address: what
    /// vgrid hands out, so that it never collides with a vendor's.
    pub fn is_local_unicast(&self) -> bool {
        self.0[0] & 0x01 == 0 && self.0[0] & 0x02 != 0
    }

    /// The MAC of a site interface: `02`, one byte of the network's name, the four bytes of its
    /// address. Unique on a network as long as addresses are, and the same wherever the VM runs.
    pub fn for_site(network: &str, address: Ipv4Addr) -> MacAddr {
        let tag = network.bytes().fold(0u8, |h, b| h.wrapping_mul(31).wrapping_add(b));
        let a = address.octets();
        MacAddr([0x02, tag, a[0], a[1], a[2], a[3]])
    }

    /// The MAC of a tunnel interface: `06` and five bytes of BLAKE3 over the VM's id, the network
    /// and `salt` (a retry after a collision takes the next salt).
    pub fn for_tunnel(vm: &str, network: &str, salt: u32) -> MacAddr {
        let h = blake3::hash(format!("{vm}/{network}/{salt}").as_bytes());
        let b = h.as_bytes();
        MacAddr([0x06, b[0], b[1], b[2], b[3], b[4]])
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl std::str::FromStr for MacAddr {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::MacSyntax { value: s.to_string() };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An IPv4 network, `A.B.C.D/LEN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0)
    }

    /// Whether `a` is inside (network and broadcast addresses included).
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr)
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        let m = self.mask() & other.mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }

    pub fn network(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// The netmask, e.g. 255.255.255.0.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Cidr {
    /// `A.B.C.D/LEN` with LEN 8-30, host bits not checked (what a request body may carry: a
    /// value of the documented shape whose host bits are set is refused by
    /// [`SiteNet::validate`], naming the field, not as a malformed body).
    fn parse_shape(s: &str) -> Result<Cidr, NetError> {
        let bad = || NetError::Cidr { value: s.to_string() };
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        if l.is_empty() || l.len() > 2 || !l.bytes().all(|b| b.is_ascii_digit()) || l.starts_with('0') {
            return Err(bad());
        }
        let len: u8 = l.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&len) {
            return Err(bad());
        }
        Ok(Cidr { addr, len })
    }

    /// Whether no host bits are set.
    pub fn is_network(&self) -> bool {
        u32::from(self.addr) & !self.mask() == 0
    }
}

impl std::str::FromStr for Cidr {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let c = Cidr::parse_shape(s)?;
        if !c.is_network() {
            return Err(NetError::Cidr { value: s.to_string() });
        }
        Ok(c)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse_shape(&s).map_err(serde::de::Error::custom)
    }
}

/// An inclusive range of IPv4 addresses, `FIRST-LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl AddrRange {
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(a))
    }

    /// How many addresses it holds.
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.last)).saturating_sub(u64::from(u32::from(self.first))) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Its addresses, in order.
    pub fn iter(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

impl std::fmt::Display for AddrRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for AddrRange {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::RangeSyntax { value: s.to_string() };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        Ok(AddrRange { first: a.trim().parse().map_err(|_| bad())?, last: b.trim().parse().map_err(|_| bad())? })
    }
}

impl Serialize for AddrRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AddrRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a site network hands its guests: addresses from `range` inside `cidr`, a gateway and
/// name servers, an MTU (DHCP options 3, 6, 26).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SiteNet {
    /// The network (no host bits set; a prefix of 8-30 bits).
    #[schema(value_type = String, example = "10.20.0.0/24", pattern = "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([89]|[12][0-9]|30)$")]
    pub cidr: Cidr,
    /// The addresses guests are given, inside `cidr` (off its network and broadcast
    /// addresses).
    #[schema(value_type = String, example = "10.20.0.100-10.20.0.199", pattern = "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])-((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$")]
    pub range: AddrRange,
    /// The router guests are told of: inside `cidr`, outside `range`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$")]
    pub gateway: Option<Ipv4Addr>,
    /// Name servers guests are told of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(schema_with = ipv4_list)]
    pub dns: Vec<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 576, maximum = 9000)]
    pub mtu: Option<u16>,
}

impl SiteNet {
    /// The range inside the network, off its network and broadcast addresses; the gateway and
    /// name servers inside it too, the gateway outside the range; the MTU sane.
    pub fn validate(&self) -> Result<(), NetError> {
        let (c, r) = (self.cidr, self.range);
        if !c.is_network() {
            return Err(NetError::Cidr { value: c.to_string() });
        }
        if self.dns.len() > MAX_DNS {
            return Err(NetError::TooManyDns { count: self.dns.len(), max: MAX_DNS });
        }
        let inside = |a: Ipv4Addr| c.contains(a) && a != c.network() && a != c.broadcast();
        if u32::from(r.first) > u32::from(r.last) || !inside(r.first) || !inside(r.last) {
            return Err(NetError::RangeOutside { first: r.first, last: r.last, cidr: c });
        }
        if let Some(g) = self.gateway {
            if !inside(g) {
                return Err(NetError::AddrOutside { what: "gateway", addr: g, cidr: c });
            }
            if r.contains(g) {
                return Err(NetError::GatewayInRange { gateway: g, first: r.first, last: r.last });
            }
        }
        if let Some(m) = self.mtu {
            if !(576..=9000).contains(&m) {
                return Err(NetError::Mtu { mtu: m });
            }
        }
        Ok(())
    }
}

/// What kind of network: a site's LAN that hosts attach to, or a user's own LAN reached by a
/// tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum NetworkKind {
    Site(SiteNet),
    Tunnel,
}

/// A network defined on the coordinator (`vgrid net create`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub name: String,
    /// Who defined it: an admin for site networks, the user whose LAN it is for tunnels.
    pub owner: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    #[serde(flatten)]
    pub kind: NetworkKind,
}

/// `POST /api/v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkCreate {
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,31}$")]
    pub name: String,
    #[serde(flatten)]
    pub kind: NetworkKind,
}

impl NetworkCreate {
    pub fn validate(&self) -> Result<(), NetError> {
        check_network_name(&self.name)?;
        match &self.kind {
            NetworkKind::Site(s) => s.validate(),
            NetworkKind::Tunnel => Ok(()),
        }
    }
}

/// A network as `vgrid net ls` shows it: the definition, the hosts attached (site) and the
/// addresses leased.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetworkInfo {
    #[serde(flatten)]
    pub network: Network,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub leases: Vec<Lease>,
    /// Addresses of the range still free (site networks).
    #[serde(default)]
    pub free: u64,
    /// Tunnel networks: the ports the coordinator's relay switches now (the owner's
    /// `vgrid tunnel`, and the interfaces of VMs on hosts without a direct link to it).
    #[serde(default)]
    pub relay_ports: u64,
}

/// One address (or, in a tunnel, one MAC) held by a VM's interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub vm: String,
    #[serde(default)]
    pub name: String,
    #[schema(value_type = String, pattern = "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")]
    pub mac: MacAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, pattern = "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$")]
    pub address: Option<Ipv4Addr>,
}

/// A host port forwarded to a guest port over user-mode networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Forward {
    #[schema(minimum = 1, maximum = 65535)]
    pub host: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub guest: u16,
}

impl std::str::FromStr for Forward {
    type Err = NetError;
    /// `HOSTPORT:GUESTPORT`, both 1-65535.
    fn from_str(s: &str) -> Result<Self, NetError> {
        let (h, g) = s.split_once(':').ok_or_else(|| NetError::ForwardSyntax { value: s.to_string() })?;
        let port = |p: &str| {
            p.parse::<u16>().ok().filter(|&v| v != 0).ok_or_else(|| NetError::ForwardPortText { port: p.to_string(), value: s.to_string() })
        };
        Ok(Forward { host: port(h)?, guest: port(g)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse_with_clear_errors() {
        assert_eq!("2222:22".parse::<Forward>().unwrap(), Forward { host: 2222, guest: 22 });
        let e = "2222".parse::<Forward>().unwrap_err().to_string();
        assert_eq!(e, "invalid forward \"2222\": expected HOSTPORT:GUESTPORT");
        let e = "0:22".parse::<Forward>().unwrap_err().to_string();
        assert_eq!(e, "invalid port \"0\" in forward \"0:22\": expected 1-65535");
        let e = "22:x".parse::<Forward>().unwrap_err().to_string();
        assert!(e.contains("\"x\""), "{e}");
    }

    #[test]
    fn net_validation_names_the_port() {
        NetConfig::user(vec![Forward { host: 2222, guest: 22 }, Forward { host: 8080, guest: 80 }]).validate().unwrap();
        let e = NetConfig::user(vec![Forward { host: 0, guest: 22 }]).validate().unwrap_err();
        assert_eq!(e.to_string(), "port forward 0->22: ports must be 1-65535");
        let e = NetConfig::user(vec![Forward { host: 2222, guest: 22 }, Forward { host: 2222, guest: 80 }]).validate().unwrap_err();
        assert_eq!(e.to_string(), "host port 2222 is forwarded twice");
    }

    #[test]
    fn nics_are_tagged_by_mode() {
        let n = NetConfig::user(vec![Forward { host: 2222, guest: 22 }]);
        let j = serde_json::to_value(&n).unwrap();
        assert_eq!(j, serde_json::json!({"nics": [{"mode": "user", "forwards": [{"host": 2222, "guest": 22}]}]}));
        assert_eq!(serde_json::from_value::<NetConfig>(j).unwrap(), n);
        assert!(n.forwards_host_port(2222) && !n.forwards_host_port(22));
    }

    #[test]
    fn nic_syntax_and_display() {
        assert_eq!("user".parse::<Nic>().unwrap(), Nic::User { forwards: vec![] });
        let n: Nic = "site:farm".parse().unwrap();
        assert_eq!(n, Nic::Site { network: "farm".into(), mac: None, address: None });
        assert_eq!(n.to_string(), "site:farm");
        assert_eq!("tunnel:home".parse::<Nic>().unwrap().to_string(), "tunnel:home");
        let e = "bridge:x".parse::<Nic>().unwrap_err().to_string();
        assert!(e.contains("expected user, site:NETWORK or tunnel:NETWORK"), "{e}");
        let e = "site:Farm!".parse::<Nic>().unwrap_err().to_string();
        assert!(e.contains("invalid network name \"Farm!\""), "{e}");
        let twice = NetConfig { nics: vec!["site:farm".parse().unwrap(), "site:farm".parse().unwrap()] };
        assert_eq!(twice.validate().unwrap_err(), NetError::NicTwice { network: "farm".into() });
    }

    #[test]
    fn macs_are_local_unicast_and_round_trip() {
        let m = MacAddr::for_site("farm", "10.20.0.100".parse().unwrap());
        assert!(m.is_local_unicast());
        assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        assert!(m.to_string().ends_with(":0a:14:00:64"), "{m}");
        let t = MacAddr::for_tunnel("vm-1", "home", 0);
        assert!(t.is_local_unicast());
        assert_ne!(t, MacAddr::for_tunnel("vm-1", "home", 1));
        assert!("01:00:5e:00:00:01".parse::<MacAddr>().map(|m| !m.is_local_unicast()).unwrap());
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00:zz".parse::<MacAddr>().is_err());
        let j = serde_json::to_value(Nic::Site { network: "farm".into(), mac: Some(m), address: Some("10.20.0.100".parse().unwrap()) })
            .unwrap();
        assert_eq!(j, serde_json::json!({"mode": "site", "network": "farm", "mac": m.to_string(), "address": "10.20.0.100"}));
    }

    /// The first pattern anywhere in `v`.
    fn pattern_in(v: &serde_json::Value) -> Option<String> {
        match v {
            serde_json::Value::Object(o) => {
                o.get("pattern").and_then(|p| p.as_str()).map(str::to_string).or_else(|| o.values().find_map(pattern_in))
            }
            serde_json::Value::Array(a) => a.iter().find_map(pattern_in),
            _ => None,
        }
    }

    /// The patterns the OpenAPI document gives these fields, from the schemas themselves.
    fn patterns() -> std::collections::HashMap<&'static str, regex::Regex> {
        use utoipa::PartialSchema;
        let site = serde_json::to_value(SiteNet::schema()).unwrap();
        let lease = serde_json::to_value(Lease::schema()).unwrap();
        let re = |v: &serde_json::Value| regex::Regex::new(&pattern_in(v).expect("a pattern")).unwrap();
        let props = &site["properties"];
        std::collections::HashMap::from([
            ("cidr", re(&props["cidr"])),
            ("range", re(&props["range"])),
            ("ipv4", re(&props["gateway"])),
            ("dns", re(&props["dns"]["items"])),
            ("mac", re(&lease["properties"]["mac"])),
        ])
    }

    #[test]
    fn the_schema_patterns_accept_what_the_parsers_accept() {
        let p = patterns();
        for s in [
            "10.20.0.0/24",
            "0.0.0.0/8",
            "255.255.255.252/30",
            "10.20.0.0/7",
            "10.20.0.0/31",
            "10.20.0.0/024",
            "010.20.0.0/24",
            "10.20.0/24",
            "10.256.0.0/16",
            " 10.0.0.0/8",
            "10.20.0.1/24",
        ] {
            // Host bits are the one thing the pattern cannot say: refused by validate (422).
            assert_eq!(p["cidr"].is_match(s), Cidr::parse_shape(s).is_ok(), "{s:?}");
        }
        for s in ["10.0.0.1", "255.255.255.255", "1.2.3", "01.2.3.4", "1.2.3.256", "1.2.3.4 ", "a.b.c.d"] {
            assert_eq!(p["ipv4"].is_match(s), s.parse::<Ipv4Addr>().is_ok(), "{s:?}");
            assert_eq!(p["dns"].is_match(s), s.parse::<Ipv4Addr>().is_ok(), "dns {s:?}");
        }
        for s in ["10.0.0.1-10.0.0.9", "10.0.0.9-10.0.0.1", "10.0.0.1 - 10.0.0.9", "10.0.0.1-", "10.0.0.1-10.0.0.300"] {
            // The parser also takes spaces around the dash; the pattern is the stricter.
            if p["range"].is_match(s) {
                assert!(s.parse::<AddrRange>().is_ok(), "{s:?}");
            }
        }
        assert!(p["range"].is_match("10.0.0.1-10.0.0.9") && !p["range"].is_match("10.0.0.1-10.0.0.300"));
        for s in ["02:00:0a:14:00:64", "02:00:0A:14:00:64", "02:00:0a:14:00", "02:00:0a:14:00:6", "02-00-0a-14-00-64", "+2:00:0a:14:00:64"]
        {
            if p["mac"].is_match(s) {
                assert!(s.parse::<MacAddr>().is_ok(), "{s:?}");
            }
        }
        assert!(!p["mac"].is_match("+2:00:0a:14:00:64") && p["mac"].is_match("02:00:0A:14:00:64"));
        let names = regex::Regex::new("^[a-z][a-z0-9_-]{0,31}$").unwrap();
        for s in ["farm", "f", "farm-2_b", "Farm", "2farm", "", "-x", &"a".repeat(32), &"a".repeat(33)] {
            assert_eq!(names.is_match(s), check_network_name(s).is_ok(), "{s:?}");
        }
    }

    #[test]
    fn a_cidr_with_host_bits_is_of_the_documented_shape_and_refused_by_validation() {
        let j = serde_json::json!({"name": "farm", "kind": "site", "cidr": "10.20.0.1/24", "range": "10.20.0.100-10.20.0.199"});
        let c: NetworkCreate = serde_json::from_value(j).unwrap();
        assert_eq!(c.validate().unwrap_err(), NetError::Cidr { value: "10.20.0.1/24".into() });
        assert!("10.20.0.1/24".parse::<Cidr>().is_err());
    }

    #[test]
    fn site_networks_are_checked() {
        let site = |cidr: &str, range: &str, gw: Option<&str>| SiteNet {
            cidr: cidr.parse().unwrap(),
            range: range.parse().unwrap(),
            gateway: gw.map(|g| g.parse().unwrap()),
            dns: vec![],
            mtu: None,
        };
        site("10.20.0.0/24", "10.20.0.100-10.20.0.199", Some("10.20.0.1")).validate().unwrap();
        let e = site("10.20.0.0/24", "10.20.0.100-10.20.1.5", None).validate().unwrap_err();
        assert!(matches!(e, NetError::RangeOutside { .. }), "{e}");
        let e = site("10.20.0.0/24", "10.20.0.100-10.20.0.255", None).validate().unwrap_err();
        assert!(matches!(e, NetError::RangeOutside { .. }), "broadcast in range: {e}");
        let e = site("10.20.0.0/24", "10.20.0.100-10.20.0.199", Some("10.20.0.150")).validate().unwrap_err();
        assert!(matches!(e, NetError::GatewayInRange { .. }), "{e}");
        assert!("10.20.0.1/24".parse::<Cidr>().is_err(), "host bits set");
        assert!("10.20.0.0/31".parse::<Cidr>().is_err());
        let a: Cidr = "10.20.0.0/16".parse().unwrap();
        assert!(a.overlaps(&"10.20.5.0/24".parse().unwrap()) && !a.overlaps(&"10.21.0.0/24".parse().unwrap()));
        assert_eq!(a.netmask().to_string(), "255.255.0.0");
        assert_eq!("10.0.0.10-10.0.0.19".parse::<AddrRange>().unwrap().len(), 10);
        let c = NetworkCreate { name: "farm".into(), kind: NetworkKind::Site(site("10.20.0.0/24", "10.20.0.100-10.20.0.199", None)) };
        let j = serde_json::to_value(&c).unwrap();
        assert_eq!(j, serde_json::json!({"name": "farm", "kind": "site", "cidr": "10.20.0.0/24", "range": "10.20.0.100-10.20.0.199"}));
        assert_eq!(serde_json::from_value::<NetworkCreate>(j).unwrap(), c);
    }
}
