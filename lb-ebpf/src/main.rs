//! XDP data plane. Thin glue: parsing and decisions live in `lb-common`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod aux;
#[cfg(target_arch = "bpf")]
mod bench;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it only has to link.
    loop {}
}

/// Host builds (clippy, `cargo check --workspace`) get an empty binary: the
/// real object only exists for `bpfel-unknown-none`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
