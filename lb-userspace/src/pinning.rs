//! Hitless restart: the data plane's maps and its XDP link are pinned under
//! `/sys/fs/bpf/<instance>/<layout fingerprint>/` (see
//! `lb_common::manifest::fingerprint`). A new lbd loads the program against
//! the pinned maps (connection table, rings and counters carry over) and
//! swaps it into the pinned link atomically (`bpf_link_update`), so the
//! interface never runs without a program.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};

use crate::dataplane::{self, AttachMode, BALANCER_OBJECT, BALANCER_PROGRAM, MapSizes};

/// This build's layout: the manifest's fingerprint, as the pin directory's
/// name. An lbd built with other map layouts looks in another directory,
/// finds this one attached, and refuses to start rather than misread it.
pub fn layout() -> String {
    format!("{:016x}", lb_common::manifest::fingerprint())
}

/// The maps that carry state across restarts.
pub fn pinned_maps() -> impl Iterator<Item = &'static str> {
    lb_common::manifest::MAPS
        .iter()
        .filter(|m| m.pinned)
        .map(|m| m.name)
}

const LINK: &str = "link";

pub fn pin_dir(instance: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{instance}/{}", layout()))
}

/// The data plane, loaded against pinned maps, and whether it adopted a
/// running one.
pub struct Pinned {
    pub ebpf: Ebpf,
    pub adopted: bool,
    pub dir: PathBuf,
}

/// Loads the balancer against the maps pinned in `dir` (creating and pinning
/// them on first start). Sizes are part of the layout: a running data plane
/// of other sizes is refused, not silently reused.
pub fn load(dir: &Path, sizes: &MapSizes) -> Result<Pinned> {
    if let Some(old) = other_layouts(dir)
        .into_iter()
        .find(|d| d.join(LINK).exists())
    {
        bail!(
            "a data plane of another map layout ({}) is attached from {}, and this lbd (layout {}) \
             cannot adopt its maps; `lbd --teardown` removes it (traffic stops until this lbd starts)",
            old.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            old.display(),
            layout()
        );
    }
    let adopted = is_attached(dir);
    if adopted {
        // Sizes are read from the pinned maps themselves: nothing else
        // survives every kind of restart (systemd empties /run).
        for (name, want) in dataplane::map_sizes(sizes)? {
            let path = dir.join(name);
            let have = aya::maps::MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?
                .info()
                .with_context(|| format!("reading {}", path.display()))?
                .max_entries();
            if have != want {
                bail!(
                    "the running data plane in {} has {name} sized {have}, the configuration asks for \
                     {want}: changing sizes needs `lbd --teardown` (a restart that drops connections)",
                    dir.display()
                );
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let paths: Vec<(&str, PathBuf)> = pinned_maps().map(|m| (m, dir.join(m))).collect();
    let mut loader = EbpfLoader::new();
    dataplane::size_maps(&mut loader, sizes)?;
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(BALANCER_OBJECT)
        .context("loading the XDP object against the pinned maps")?;
    dataplane::program_mut(&mut ebpf, BALANCER_PROGRAM)?
        .load()
        .context("verifying the balancer program")?;
    Ok(Pinned {
        ebpf,
        adopted,
        dir: dir.to_owned(),
    })
}

/// Attaches the balancer: into the pinned link when adopting (an atomic
/// program swap), else through a new link, which is then pinned.
pub fn attach(
    ebpf: &mut Ebpf,
    dir: &Path,
    adopted: bool,
    interface: &str,
    mode: AttachMode,
) -> Result<()> {
    attach_pinned(
        ebpf,
        BALANCER_PROGRAM,
        &dir.join(LINK),
        adopted,
        interface,
        mode,
    )
}

/// [`attach`] for any of the object's XDP programs, its link pinned at
/// `link_path` (the backend role pins `decap` this way).
pub fn attach_pinned(
    ebpf: &mut Ebpf,
    program: &str,
    link_path: &Path,
    adopted: bool,
    interface: &str,
    mode: AttachMode,
) -> Result<()> {
    if adopted {
        let prog = dataplane::program_mut(ebpf, program)?;
        let pinned = PinnedLink::from_pin(link_path)
            .with_context(|| format!("opening {}", link_path.display()))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .context("the pinned link is not an XDP link")?;
        prog.attach_to_link(link)
            .context("swapping the new program into the running link")?;
        tracing::info!(
            program,
            interface,
            "adopted the running data plane; program replaced in place"
        );
        return Ok(());
    }
    let attached = dataplane::attach_program(ebpf, program, interface, mode)?;
    let prog = dataplane::program_mut(ebpf, program)?;
    let link = prog
        .take_link(attached.into_link_id()?)
        .context("taking the XDP link")?;
    let fd = FdLink::try_from(link)
        .context("this kernel attached XDP without a bpf_link; cannot pin it")?;
    fd.pin(link_path)
        .with_context(|| format!("pinning the link at {}", link_path.display()))?;
    Ok(())
}

/// Pin directories of the same instance for other layouts (left by an older
/// or newer lbd): named by a fingerprint, or `v<n>` as lbds before the
/// fingerprint named them.
pub fn other_layouts(dir: &Path) -> Vec<PathBuf> {
    sibling_dirs(dir, is_layout_name)
}

/// The entries beside `dir` (not `dir` itself) whose names `is_layout`
/// accepts: either role's pin directories of other layouts.
pub(crate) fn sibling_dirs(dir: &Path, is_layout: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Some(parent) = dir.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p != dir
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(&is_layout)
        })
        .collect()
}

fn is_layout_name(name: &str) -> bool {
    let fingerprint = name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit());
    let numbered = name
        .strip_prefix('v')
        .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
    fingerprint || numbered
}

/// Whether a data plane is attached from `dir` (a start adopts it).
pub fn is_attached(dir: &Path) -> bool {
    dir.join(LINK).exists()
}

/// Undoes a fresh start that failed: this layout's pins (the maps pinned
/// before the one that could not be created, the link if it was pinned) and
/// the directories, and nothing of any other layout. Best effort: logged.
pub fn discard(dir: &Path) {
    match teardown_one(dir) {
        Ok(true) => tracing::info!(pins = %dir.display(), "failed start: pins removed"),
        Ok(false) => {}
        Err(e) => tracing::error!(error = %format!("{e:#}"), "failed start: removing the pins"),
    }
}

/// Removes every pin of the instance, every layout version: the link goes
/// (the program detaches) and the maps are freed once nothing holds them.
pub fn teardown(dir: &Path) -> Result<bool> {
    let mut removed = false;
    for old in other_layouts(dir) {
        removed |= teardown_one(&old)?;
    }
    Ok(teardown_one(dir)? || removed)
}

/// Unpins the link and the maps of one layout version (of either role's
/// pins; the link first, so the program stops before its maps go). Names
/// outside the current layout are removed too: an older layout may have
/// had other maps. The instance directory goes too once empty.
pub(crate) fn teardown_one(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    let link = dir.join(LINK);
    if link.exists() {
        std::fs::remove_file(&link).with_context(|| format!("unpinning {}", link.display()))?;
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        std::fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    if let Some(parent) = dir.parent() {
        // The instance directory, if no other layout version lives there.
        let _ = std::fs::remove_dir(parent);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An instance directory as another lbd left it: `layout` attached.
    fn instance_with(name: &str, layout: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("lb-pin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(layout)).unwrap();
        for f in [LINK, "CONNTRACK", "RINGS"] {
            std::fs::write(root.join(layout).join(f), b"").unwrap();
        }
        root
    }

    fn instance_with_v1(name: &str) -> PathBuf {
        instance_with(name, "v1")
    }

    /// An lbd built with other map layouts (another fingerprint) is refused
    /// before anything is created, and the message names both layouts.
    #[test]
    fn another_fingerprint_in_service_is_refused() {
        let other = if layout() == "0123456789abcdef" {
            "fedcba9876543210"
        } else {
            "0123456789abcdef"
        };
        let root = instance_with("fingerprint", other);
        let dir = root.join(layout());
        let msg = format!(
            "{:#}",
            load(&dir, &MapSizes::default()).err().expect("refused")
        );
        assert!(
            msg.contains(&format!("another map layout ({other})")),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("this lbd (layout {})", layout())),
            "{msg}"
        );
        assert!(!dir.exists(), "nothing created for the new layout");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn another_layout_in_service_is_refused_before_touching_the_kernel() {
        let root = instance_with_v1("refuse");
        let dir = root.join(layout());
        let err = load(&dir, &MapSizes::default()).err().expect("refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("another map layout (v1)"), "{msg}");
        assert!(msg.contains(&layout()), "names this lbd's layout: {msg}");
        assert!(!dir.exists(), "nothing created for the new layout");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn teardown_removes_every_layout_of_the_instance() {
        let root = instance_with_v1("teardown");
        let dir = root.join(layout());
        assert!(teardown(&dir).unwrap());
        assert!(!root.exists(), "instance directory removed");
        assert!(!teardown(&dir).unwrap(), "nothing left the second time");
    }
}
