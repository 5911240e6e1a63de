//! The XDP object must not call the compiler's `mem*` builtins. In BPF they
//! are linked in as byte-loop subprograms, and every call costs tens of
//! nanoseconds per packet (we found three hot paths doing it: zero-filled
//! address arrays, VIP key comparison, MAC copies). Spell such copies out
//! instead; see `lb_common::parse::v4_in_16` and `lb_common::viptable`.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget};

#[test]
fn no_calls_to_mem_builtins() {
    let obj =
        object::File::parse(lb_userspace::dataplane::BALANCER_OBJECT).expect("parse the eBPF ELF");
    let mut calls = Vec::new();
    for section in obj.sections() {
        let section_name = section.name().unwrap_or("?").to_owned();
        for (offset, reloc) in section.relocations() {
            if let RelocationTarget::Symbol(idx) = reloc.target()
                && let Ok(sym) = obj.symbol_by_index(idx)
                && let Ok(name) = sym.name()
                && matches!(name, "memcpy" | "memmove" | "memset" | "memcmp" | "bcmp")
            {
                calls.push(format!("{section_name}+{offset:#x}: {name}"));
            }
        }
    }
    assert!(
        calls.is_empty(),
        "the XDP object calls mem builtins: {calls:#?}"
    );
}
