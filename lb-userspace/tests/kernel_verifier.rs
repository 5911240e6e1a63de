//! Verifier limits, guarded. The balancer runs close to two of them: the
//! 512-byte stack (its frame plus the deepest global function it calls)
//! and the work the verifier does to load it. A change that crosses a
//! budget below fails here, with the numbers, instead of at load time on
//! an operator's machine (or as a slow start).
//!
//! The kernel does not report a program's stack depth after a successful
//! load, so it is read from the object: the deepest `r10`-relative access
//! or stack address each function makes, which is what the verifier sizes
//! a frame by.

use std::collections::BTreeMap;

use lb_userspace::dataplane::{self, BALANCER_OBJECT, BALANCER_PROGRAM};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

/// The balancer's own frame, in bytes. Measured 416 when this was written
/// (448 before the per-packet policy moved to `lb_common::policy`).
const BALANCER_STACK_BUDGET: u64 = 448;
/// The frame of the deepest global function the balancer calls. Measured
/// 72 (`lb_entry_slot`) when this was written: 56 before entries had
/// classes (embryonic, established), 48 before the connection table's
/// backend and seal became volatile loads.
const CALLEE_STACK_BUDGET: u64 = 80;
/// The verifier's limit for a frame and its callees together.
const STACK_LIMIT: u64 = 512;
/// Instructions the verifier processes to load the balancer (the kernel's
/// `verified_insns`); 149,020 since `gue` (its encapsulation and the
/// second hop), 132,625 before, 106,219 before a new flow could find its
/// ways all established and go unrecorded. The kernel refuses at 1,000,000,
/// but load time grows with it (1.5 s at 522,000); the budget leaves room
/// for one more feature, not for a regression that doubles it.
const VERIFIED_INSNS_BUDGET: u32 = 170_000;
/// Instructions in the balancer's own section.
const PROGRAM_INSNS_BUDGET: usize = 4_500;

const BPF_LD: u8 = 0x00;
const BPF_LDX: u8 = 0x01;
const BPF_ST: u8 = 0x02;
const BPF_STX: u8 = 0x03;
const BPF_ALU64: u8 = 0x07;
const FRAME_POINTER: u8 = 10;

/// The deepest stack byte one function's code touches or takes the
/// address of. Registers are followed through `rX = r10` and `rX += imm`
/// within the function, which is how LLVM forms stack addresses.
fn frame_depth(code: &[u8]) -> u64 {
    let mut deepest = 0i64;
    // Per register: its offset from r10, if it holds a stack address.
    let mut stack_ptr: [Option<i64>; 11] = [None; 11];
    let mut i = 0;
    while i + 8 <= code.len() {
        let insn = &code[i..i + 8];
        let op = insn[0];
        let dst = (insn[1] & 0x0f) as usize;
        let src = (insn[1] >> 4) as usize;
        let off = i16::from_le_bytes([insn[2], insn[3]]) as i64;
        let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]) as i64;
        let class = op & 0x07;
        let mut touched = |base: usize, extra: i64| {
            let at = if base == FRAME_POINTER as usize {
                Some(extra)
            } else {
                stack_ptr.get(base).copied().flatten().map(|k| k + extra)
            };
            if let Some(at) = at {
                deepest = deepest.min(at);
            }
        };
        match class {
            BPF_LDX => touched(src, off),
            BPF_ST | BPF_STX => touched(dst, off),
            _ => {}
        }
        if dst < stack_ptr.len() {
            match (class, op) {
                // mov64 dst, src
                (BPF_ALU64, 0xbf) => {
                    stack_ptr[dst] = if src == FRAME_POINTER as usize {
                        Some(0)
                    } else {
                        stack_ptr.get(src).copied().flatten()
                    };
                }
                // add64 dst, imm
                (BPF_ALU64, 0x07) => {
                    if let Some(k) = stack_ptr[dst] {
                        stack_ptr[dst] = Some(k + imm);
                        deepest = deepest.min(k + imm);
                    }
                }
                (BPF_LDX, _) | (BPF_ALU64, _) | (BPF_LD, _) => stack_ptr[dst] = None,
                _ => {}
            }
        }
        // A call clobbers r0-r5.
        if op == 0x85 {
            for r in stack_ptr.iter_mut().take(6) {
                *r = None;
            }
        }
        // lddw takes two slots.
        i += if op == 0x18 { 16 } else { 8 };
    }
    (-deepest) as u64
}

/// Every function symbol of the object: its frame size and instruction
/// count.
fn functions() -> BTreeMap<String, (u64, usize)> {
    let obj = object::File::parse(BALANCER_OBJECT).expect("parse the eBPF ELF");
    let mut out = BTreeMap::new();
    for sym in obj.symbols() {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Some(section) = sym
            .section_index()
            .and_then(|i| obj.section_by_index(i).ok())
        else {
            continue;
        };
        let data = section.data().expect("section data");
        let start = (sym.address() - section.address()) as usize;
        let code = &data[start..start + sym.size() as usize];
        out.insert(
            sym.name().expect("symbol name").to_owned(),
            (frame_depth(code), code.len() / 8),
        );
    }
    out
}

#[test]
fn stack_frames_stay_within_budget() {
    let funcs = functions();
    let (balancer, insns) = funcs[BALANCER_PROGRAM];
    let callees: Vec<(&String, u64)> = funcs
        .iter()
        .filter(|(name, _)| name.starts_with("lb_"))
        .map(|(n, (depth, _))| (n, *depth))
        .collect();
    assert!(
        !callees.is_empty(),
        "the global functions are in the object"
    );
    let deepest_callee = callees.iter().map(|(_, d)| *d).max().unwrap_or(0);
    eprintln!(
        "balancer: frame {balancer} bytes, {insns} instructions; global functions: {callees:?}"
    );
    assert!(
        balancer <= BALANCER_STACK_BUDGET,
        "the balancer's frame is {balancer} bytes, over its budget of {BALANCER_STACK_BUDGET}"
    );
    assert!(
        deepest_callee <= CALLEE_STACK_BUDGET,
        "a global function's frame is {deepest_callee} bytes, over its budget of {CALLEE_STACK_BUDGET}"
    );
    assert!(
        balancer + deepest_callee <= STACK_LIMIT,
        "{balancer} + {deepest_callee} bytes of stack: over the verifier's {STACK_LIMIT}"
    );
    assert!(
        insns <= PROGRAM_INSNS_BUDGET,
        "the balancer is {insns} instructions, over its budget of {PROGRAM_INSNS_BUDGET}"
    );
}

#[test]
fn the_frame_analysis_sees_stack_accesses() {
    // r1 = r10; r1 += -48; *(u64 *)(r10 - 16) = r2; r3 = *(u64 *)(r1 + 8)
    let code: Vec<u8> = [
        [0xbf, 0xa1, 0, 0, 0, 0, 0, 0],
        [0x07, 0x01, 0, 0, 0xd0, 0xff, 0xff, 0xff],
        [0x7b, 0x2a, 0xf0, 0xff, 0, 0, 0, 0],
        [0x79, 0x13, 0x08, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(frame_depth(&code), 48);
    assert_eq!(frame_depth(&code[16..24]), 16);
}

#[test]
fn the_verifier_processes_a_bounded_number_of_instructions() {
    let mut ebpf = dataplane::load_balancer().expect("load the balancer (are we root?)");
    let prog = dataplane::program_mut(&mut ebpf, BALANCER_PROGRAM).expect("balancer program");
    let verified = prog
        .info()
        .expect("program info")
        .verified_instruction_count()
        .expect("this kernel reports verified_insns");
    eprintln!("balancer: {verified} instructions verified");
    assert!(
        verified <= VERIFIED_INSNS_BUDGET,
        "the verifier processed {verified} instructions to load the balancer, over the budget of {VERIFIED_INSNS_BUDGET}"
    );
}
