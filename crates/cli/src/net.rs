//! `vgrid net`: define, list, show and remove networks (the coordinator allocates their
//! addresses; see the README's "Networks").

use std::net::Ipv4Addr;
use std::process::ExitCode;

use vgrid_api::net::{AddrRange, Cidr, Network, NetworkCreate, NetworkInfo, NetworkKind, SiteNet};

use crate::output::{print_json, table};

#[derive(clap::Subcommand, Debug)]
pub enum NetCmd {
    /// Define a network. A site network (admins) is a LAN that hosts attach to with
    /// `vgrid host --network NAME=BRIDGE`; guests on it (`vm run --net site:NAME`) get an address
    /// from --range by DHCP from their host, the same address wherever they run. A tunnel
    /// network (`--tunnel`, any user) is your own LAN, reached through `vgrid tunnel NAME`.
    Create(CreateArgs),
    /// The networks you may see: site networks and your own tunnel networks.
    Ls,
    /// One network: its definition, the hosts attached, the addresses leased.
    Show { name: String },
    /// Remove a network no VM holds an address on.
    Rm { name: String },
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Network name: 1-32 of a-z, 0-9, '-', '_', starting with a letter.
    pub name: String,
    /// The network, e.g. 10.20.0.0/24 (site networks).
    #[arg(long, required_unless_present = "tunnel", conflicts_with = "tunnel")]
    pub cidr: Option<Cidr>,
    /// The addresses guests are given, e.g. 10.20.0.100-10.20.0.199 (site networks).
    #[arg(long, required_unless_present = "tunnel", conflicts_with = "tunnel")]
    pub range: Option<AddrRange>,
    /// The router guests are told of (DHCP option 3); outside --range.
    #[arg(long, conflicts_with = "tunnel")]
    pub gateway: Option<Ipv4Addr>,
    /// A name server guests are told of (DHCP option 6); repeat for more.
    #[arg(long, conflicts_with = "tunnel")]
    pub dns: Vec<Ipv4Addr>,
    /// The MTU guests are told to use (DHCP option 26), 576-9000.
    #[arg(long, conflicts_with = "tunnel")]
    pub mtu: Option<u16>,
    /// A tunnel network: your own LAN, joined by `vgrid tunnel NAME` on your machine.
    #[arg(long)]
    pub tunnel: bool,
}

pub async fn run(ctx: &crate::Ctx, c: NetCmd) -> anyhow::Result<ExitCode> {
    let api = ctx.api();
    match c {
        NetCmd::Create(a) => {
            let kind = match (a.tunnel, a.cidr, a.range) {
                (true, _, _) => NetworkKind::Tunnel,
                (false, Some(cidr), Some(range)) => NetworkKind::Site(SiteNet { cidr, range, gateway: a.gateway, dns: a.dns, mtu: a.mtu }),
                _ => anyhow::bail!("{}", vgrid_api::net::NetError::SiteNeedsRange),
            };
            let req = NetworkCreate { name: a.name, kind };
            req.validate()?;
            let n: Network = api.post("/api/v1/networks", &req).await?;
            if ctx.json {
                print_json(&n)?;
            } else {
                println!("network {} defined ({})", n.name, describe(&n.kind));
            }
        }
        NetCmd::Ls => {
            let v: Vec<NetworkInfo> = api.get("/api/v1/networks").await?;
            if ctx.json {
                print_json(&v)?;
            } else {
                let rows = v
                    .iter()
                    .map(|n| {
                        let free = match n.network.kind {
                            NetworkKind::Site(_) => n.free.to_string(),
                            NetworkKind::Tunnel => "-".into(),
                        };
                        vec![
                            n.network.name.clone(),
                            describe(&n.network.kind),
                            n.network.owner.clone(),
                            if n.hosts.is_empty() { "-".into() } else { n.hosts.join(",") },
                            n.leases.len().to_string(),
                            free,
                        ]
                    })
                    .collect();
                println!("{}", table(&["NAME", "KIND", "OWNER", "HOSTS", "VMS", "FREE"], rows));
            }
        }
        NetCmd::Show { name } => {
            let n: NetworkInfo = api.get(&format!("/api/v1/networks/{name}")).await?;
            if ctx.json {
                print_json(&n)?;
            } else {
                println!("network {}: {} (owner {})", n.network.name, describe(&n.network.kind), n.network.owner);
                if let NetworkKind::Site(s) = &n.network.kind {
                    let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
                    let dns: Vec<String> = s.dns.iter().map(ToString::to_string).collect();
                    println!(
                        "  gateway {}  dns {}  mtu {}",
                        opt(s.gateway.map(|g| g.to_string())),
                        if dns.is_empty() { "-".into() } else { dns.join(",") },
                        opt(s.mtu.map(|m| m.to_string()))
                    );
                    println!(
                        "  hosts attached: {}",
                        if n.hosts.is_empty() { "none (vgrid host --network NAME=BRIDGE)".into() } else { n.hosts.join(", ") }
                    );
                    println!("  {} of {} addresses free", n.free, s.range.len());
                } else {
                    println!("  relay: {} ports now (your vgrid tunnel and the VMs on hosts without a direct link to it)", n.relay_ports);
                }
                let rows = n
                    .leases
                    .iter()
                    .map(|l| {
                        vec![
                            l.address.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                            l.mac.to_string(),
                            l.name.clone(),
                            l.vm.clone(),
                        ]
                    })
                    .collect();
                println!("{}", table(&["ADDRESS", "MAC", "VM", "ID"], rows));
            }
        }
        NetCmd::Rm { name } => {
            let n: Network = api.delete(&format!("/api/v1/networks/{name}")).await?;
            if ctx.json {
                print_json(&n)?;
            } else {
                println!("network {} removed", n.name);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn describe(k: &NetworkKind) -> String {
    match k {
        NetworkKind::Site(s) => format!("site {} range {}", s.cidr, s.range),
        NetworkKind::Tunnel => "tunnel".into(),
    }
}
