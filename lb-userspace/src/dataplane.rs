//! Loading the XDP object and attaching it to an interface.

use std::{fmt, str::FromStr};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::manifest::{MAPS, Size};

/// The balancer object built by `build.rs`, aligned for the ELF parser.
pub static BALANCER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

pub const BALANCER_PROGRAM: &str = "balancer";

/// How the program is attached. `Auto` tries native first and falls back to
/// generic, so a NIC without driver support still balances (slower).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Generic,
    Auto,
}

impl FromStr for AttachMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" | "driver" => Ok(Self::Native),
            "generic" | "skb" => Ok(Self::Generic),
            "auto" => Ok(Self::Auto),
            other => bail!("unknown XDP mode {other:?}: expected native, generic or auto"),
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::Auto => "auto",
        })
    }
}

pub const DECAP_PROGRAM: &str = "decap";

/// Map sizes chosen at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapSizes {
    pub max_vips: u32,
    pub max_backends: u32,
    /// Maglev table size M (prime).
    pub ring_size: u32,
    /// Connection-table capacity in flows; the table holds the next power
    /// of two (see [`MapSizes::conntrack_slots`]).
    pub conntrack_entries: u32,
    /// Per-CPU flow cache slots (a power of two).
    pub flow_cache_slots: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            max_vips: 64,
            max_backends: 4096,
            ring_size: lb_common::maglev::DEFAULT_RING_SIZE,
            conntrack_entries: 1 << 20,
            flow_cache_slots: 1 << 16,
        }
    }
}

impl MapSizes {
    /// `CONNTRACK` slots: buckets of `WAYS` slots, a power of two of them, so
    /// the data plane picks a bucket with a mask.
    pub fn conntrack_slots(&self) -> u32 {
        // Configuration caps entries at 2^26; saturate rather than wrap for
        // anything else.
        self.conntrack_entries
            .max(lb_common::conntrack::WAYS)
            .checked_next_power_of_two()
            .unwrap_or(1 << 31)
    }

    /// `RINGS` elements: two generations of M slots per VIP, 16 slots per
    /// element.
    pub fn ring_entries(&self) -> Result<u32> {
        self.max_vips
            .checked_mul(lb_common::ring::chunks_per_vip(self.ring_size))
            .with_context(|| {
                format!(
                    "{} VIPs x 2 generations x ring size {} overflows the RINGS map",
                    self.max_vips, self.ring_size
                )
            })
    }
}

/// Loads the balancer object with default map sizes.
pub fn load_balancer() -> Result<Ebpf> {
    load_balancer_with(&MapSizes::default())
}

impl MapSizes {
    /// `max_entries` of a map sized from `size`.
    pub fn entries(&self, size: Size) -> Result<u32> {
        Ok(match size {
            Size::Fixed(n) => n,
            Size::VipTable => 2 * lb_common::viptable::slots_for(self.max_vips),
            Size::MaxVips => self.max_vips,
            Size::MaxBackends => self.max_backends,
            Size::Rings => self.ring_entries()?,
            Size::ConntrackSlots => self.conntrack_slots(),
            Size::ConntrackBuckets => self.conntrack_slots() / lb_common::conntrack::WAYS,
            Size::FlowCacheSlots => self.flow_cache_slots.next_power_of_two(),
            Size::Counters => lb_common::stats::Counter::COUNT,
        })
    }
}

/// Every map's `max_entries` for these sizes, from the manifest.
pub fn map_sizes(sizes: &MapSizes) -> Result<Vec<(&'static str, u32)>> {
    MAPS.iter()
        .map(|m| Ok((m.name, sizes.entries(m.size)?)))
        .collect()
}

/// Sets the configured map sizes on a loader.
pub fn size_maps(loader: &mut EbpfLoader<'_>, sizes: &MapSizes) -> Result<()> {
    for (name, n) in map_sizes(sizes)? {
        loader.map_max_entries(name, n);
    }
    Ok(())
}

/// Loads the balancer object (maps created, program verified but not attached).
pub fn load_balancer_with(sizes: &MapSizes) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    size_maps(&mut loader, sizes)?;
    let mut ebpf = loader
        .load(BALANCER_OBJECT)
        .context("loading the XDP object into the kernel")?;
    let prog: &mut Xdp = program_mut(&mut ebpf, BALANCER_PROGRAM)?;
    prog.load().context("verifying the balancer program")?;
    Ok(ebpf)
}

pub fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {name} is not XDP"))
}

/// An attached program. [`Attached::detach`] detaches it; so does dropping
/// the `Ebpf` that owns the program.
pub struct Attached {
    pub program: String,
    pub interface: String,
    pub mode: AttachMode,
    link: Option<XdpLinkId>,
}

pub const PASS_PROGRAM: &str = "pass";
pub const MAC_SWAP_PROGRAM: &str = "mac_swap_tx";

/// Attaches the balancer.
pub fn attach(ebpf: &mut Ebpf, interface: &str, mode: AttachMode) -> Result<Attached> {
    attach_program(ebpf, BALANCER_PROGRAM, interface, mode)
}

/// Loads (if needed) and attaches one of the object's programs.
pub fn attach_program(
    ebpf: &mut Ebpf,
    program: &str,
    interface: &str,
    mode: AttachMode,
) -> Result<Attached> {
    let prog = program_mut(ebpf, program)?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("verifying program {program}"))?;
    }
    let try_mode = |prog: &mut Xdp, m: XdpMode| prog.attach(interface, m);
    let (link, used) = match mode {
        AttachMode::Native => (try_mode(prog, XdpMode::Driver), AttachMode::Native),
        AttachMode::Generic => (try_mode(prog, XdpMode::Skb), AttachMode::Generic),
        AttachMode::Auto => match try_mode(prog, XdpMode::Driver) {
            Ok(l) => (Ok(l), AttachMode::Native),
            Err(e) => {
                tracing::warn!(interface, error = %e, "native XDP refused, falling back to generic");
                (try_mode(prog, XdpMode::Skb), AttachMode::Generic)
            }
        },
    };
    let link = link.with_context(|| format!("attaching XDP to {interface} in {used} mode"))?;
    tracing::info!(program, interface, mode = %used, "XDP program attached");
    Ok(Attached {
        program: program.to_owned(),
        interface: interface.to_owned(),
        mode: used,
        link: Some(link),
    })
}

impl Attached {
    /// Hands the link over (to pin it); this handle no longer detaches.
    pub fn into_link_id(mut self) -> Result<XdpLinkId> {
        self.link.take().context("the program is not attached")
    }

    pub fn detach(mut self, ebpf: &mut Ebpf) -> Result<()> {
        if let Some(link) = self.link.take() {
            program_mut(ebpf, &self.program)?
                .detach(link)
                .with_context(|| format!("detaching XDP from {}", self.interface))?;
            tracing::info!(interface = %self.interface, "XDP program detached");
        }
        Ok(())
    }
}
