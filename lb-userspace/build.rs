//! Builds the XDP object with the nightly toolchain (aya-build) so that
//! `cargo build -p lb-userspace` on a fresh clone embeds a current object and
//! never fails for lack of one. `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../lb-ebpf");
    // aya-build watches lb-ebpf; the shared logic it compiles in lives here.
    println!("cargo:rerun-if-changed={manifest_dir}/../lb-common/src");
    // aya-build relays every line the nested cargo prints as a build warning;
    // keep only the ones that matter (errors and real warnings).
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "building the XDP object failed: {e:#}\n\
             (the eBPF toolchain may be missing: run `cargo xtask setup`)"
        )
    })
}
