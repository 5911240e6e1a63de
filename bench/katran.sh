#!/usr/bin/env bash
# Katran beside xdplb in `cargo xtask bench`, reproducibly.
#
# Builds Katran's balancer_ingress (katran/lib/bpf/balancer.bpf.c) from a
# Katran source checkout with Katran's own recipe (katran/lib/Makefile-bpf,
# in the build-directory layout build_bpf_modules_opensource.sh makes), pins
# it with bpftool once per LRU variant, fills its maps for the bench's two
# VIPs, then runs the benchmark with every variant as --compare-pinned, so
# that Katran's rows come from the same run as ours. Nothing of Katran is
# copied into this repository; its pins are removed on exit.
#
# Usage: bench/katran.sh [--xdp-only] KATRAN_SRC [LB-BENCH ARGS...]
# See usage() below.

set -euo pipefail

# Per-CPU LRU entries of each variant, by pin name; 0: no per-CPU LRU, so
# Katran falls back to its fixed 1,000-entry table (what its tester uses).
declare -A LRU_ENTRIES=([fb]=0 [16k]=16384 [1m]=1048576)
declare -A LABEL=(
	[fb]="katran, 1000-entry LRU"
	[16k]="katran, 16384-entry LRU"
	[1m]="katran, 1M-entry LRU"
)
VARIANTS=${KATRAN_VARIANTS:-fb 16k 1m}
BPFFS=/sys/fs/bpf
# Katran's flood guard (new connections per second per CPU before it stops
# inserting into the LRU; 125000 by default) raised so that every new-flow
# row times an insert.
MAX_CONN_RATE=1000000000
# The bench's frames (bench/src/xdp.rs): VIP 0 is 198.18.100.1:80/tcp, VIP 1
# fd00:198:18:100::1 port 80/tcp; 10 reals each, like ours.
REALS_PER_VIP=10
RING_SIZE=65537 # Katran's RING_SIZE (balancer_consts.h), per VIP
# ctl_array[0]: the MAC Katran writes as the destination of every packet it
# sends (the default router's); without it every packet is dropped.
DEFAULT_MAC="2 0 198 18 0 254"

usage() {
	cat <<EOF
Usage: ${0##*/} [--xdp-only] KATRAN_SRC [LB-BENCH ARGS...]

Builds Katran's balancer_ingress from the Katran source checkout KATRAN_SRC
(the directory holding katran/lib/bpf/balancer.bpf.c) with its
Makefile-bpf recipe (and MAX_CONN_RATE=$MAX_CONN_RATE), pins one copy per
LRU variant under $BPFFS/katran_<variant>/prog, configures them for the
bench's VIPs and runs

  cargo xtask bench --compare-pinned "katran, 1M-entry LRU=$BPFFS/katran_1m/prog" ... [LB-BENCH ARGS...]

from this repository: the full benchmark (every section), unless
--xdp-only (or KATRAN_XDP_ONLY=1) restricts it to --xdp, the per-packet
section Katran takes part in. Further arguments go to lb-bench, e.g.
  ${0##*/} --xdp-only ~/katran --rounds 5 --repeat 200000 --out /tmp/xdp.md

Variants (KATRAN_VARIANTS, default "fb 16k 1m"): fb = no per-CPU LRU
(Katran's 1,000-entry fallback table), 16k = a 16384-entry LRU per CPU,
1m = a 1048576-entry LRU per CPU (production-like). Missing tools (clang,
llc, bpftool, make, kernel headers) are installed with apt-get. Run as root;
the pins are removed on exit.
EOF
}

die() {
	echo "${0##*/}: $*" >&2
	exit 1
}

xdp_only=${KATRAN_XDP_ONLY:-0}
while [[ $# -gt 0 ]]; do
	case $1 in
	--xdp-only)
		xdp_only=1
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	--)
		shift
		break
		;;
	-*)
		usage >&2
		exit 2
		;;
	*) break ;;
	esac
done
if [[ $# -lt 1 ]]; then
	usage >&2
	exit 2
fi
src=$(cd "$1" && pwd) || die "no directory $1"
shift
[[ -f $src/katran/lib/bpf/balancer.bpf.c && -f $src/katran/lib/Makefile-bpf ]] ||
	die "$src is not a Katran source checkout (no katran/lib/bpf/balancer.bpf.c or katran/lib/Makefile-bpf)"
[[ $EUID -eq 0 ]] || die "run as root (bpffs pins, BPF_PROG_TEST_RUN)"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for v in $VARIANTS; do
	[[ -n ${LRU_ENTRIES[$v]+set} ]] || die "unknown variant $v in KATRAN_VARIANTS (fb, 16k, 1m)"
done

# --- tools -------------------------------------------------------------------
missing=()
command -v clang >/dev/null || missing+=(clang)
command -v llc >/dev/null || missing+=(llvm)
command -v bpftool >/dev/null || missing+=(bpftool)
command -v make >/dev/null || missing+=(make)
[[ -f /usr/include/linux/in.h ]] || missing+=(linux-libc-dev)
if [[ ${#missing[@]} -gt 0 ]]; then
	echo "installing ${missing[*]} (apt-get)" >&2
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- cleanup -------------------------------------------------------------------
build=$(mktemp -d /tmp/katran-build.XXXXXX)
pins=()
cleanup() {
	local p
	for p in "${pins[@]}"; do
		rm -rf "$p"
	done
	rm -rf "$build"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for v in $VARIANTS; do
	p=$BPFFS/katran_$v
	[[ ! -e $p ]] || die "$p exists (another run, or one killed before its cleanup): remove it first (rm -r $p)"
done

# --- build ---------------------------------------------------------------------
# The layout build_bpf_modules_opensource.sh makes for Makefile-bpf: its
# include flags are -I./usr/include -I./include -I. in this directory.
# KATRAN_XDP_HAS_FRAGS stays undefined: a frags-aware program ("xdp.frags")
# may not be tail-called from the bench's (non-frags) restoring wrapper.
mkdir -p "$build/include" "$build/katran/lib" "$build/bpf"
cp "$src/katran/lib/Makefile-bpf" "$build/Makefile"
cp -r "$src/katran/lib/bpf" "$src/katran/lib/linux_includes" "$build/katran/lib/"
cp "$src"/katran/lib/linux_includes/* "$build/include/"
echo "building balancer.bpf.o from $src ($(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo 'not a git work tree'))" >&2
make -s -C "$build" bpf/balancer.bpf.o EXTRA_CFLAGS="-DMAX_CONN_RATE=$MAX_CONN_RATE" CLANG=clang LLC=llc
obj=$build/bpf/balancer.bpf.o
[[ -s $obj ]] || die "the build produced no $obj"

# --- load, pin, configure ------------------------------------------------------
# Little-endian u32 as bpftool's decimal bytes.
le32() {
	echo "$(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255))"
}
zeros() {
	local n=$1 out=""
	while ((n-- > 0)); do out+=" 0"; done
	echo "${out# }"
}

# Per-CPU LRUs go into lru_mapping at the index bpf_get_smp_processor_id()
# returns: every possible CPU (at most Katran's MAX_SUPPORTED_CPUS, 128).
ncpu=$(awk -F'[-,]' '{print $NF + 1}' /sys/devices/system/cpu/possible)
((ncpu <= 128)) || ncpu=128

first=""
for v in $VARIANTS; do
	pin=$BPFFS/katran_$v
	mkdir -p "$pin"
	pins+=("$pin")
	reuse=()
	if [[ -n $first ]]; then
		# Every map but the LRUs is shared with the first variant: one
		# configuration, and one copy of Katran's 128 MiB ring array.
		for m in "$first"/maps/*; do
			name=${m##*/}
			case $name in
			lru_mapping | fallback_cache) ;;
			*) reuse+=(map name "$name" pinned "$m") ;;
			esac
		done
	fi
	bpftool prog load "$obj" "$pin/prog" type xdp "${reuse[@]}" pinmaps "$pin/maps" 2> >(grep -v 'skipping .*eh_frame' >&2)
	entries=${LRU_ENTRIES[$v]}
	if ((entries > 0)); then
		for ((cpu = 0; cpu < ncpu; cpu++)); do
			# struct flow_key (40 bytes) -> struct real_pos_lru (16 bytes).
			bpftool map create "$pin/lru$cpu" type lru_hash key 40 value 16 \
				entries "$entries" name "katran_lru$cpu"
			read -ra key <<<"$(le32 "$cpu")"
			bpftool map update pinned "$pin/maps/lru_mapping" key "${key[@]}" \
				value pinned "$pin/lru$cpu"
		done
	fi
	if [[ -z $first ]]; then
		first=$pin
		m=$pin/maps
		{
			echo "map update pinned $m/ctl_array key $(le32 0) value $DEFAULT_MAC 0 0"
			# struct vip_definition: address (16 bytes, IPv4 in the first 4),
			# port (network order), proto, padding -> struct vip_meta: flags,
			# vip_num (the VIP's ring: ch_rings[vip_num * RING_SIZE + hash]).
			echo "map update pinned $m/vip_map key 198 18 100 1 $(zeros 12) 0 80 6 0 value $(le32 0) $(le32 0)"
			echo "map update pinned $m/vip_map key 253 0 1 152 0 24 1 0 $(zeros 7) 1 0 80 6 0 value $(le32 0) $(le32 1)"
			# struct real_definition: address (16 bytes), flags (F_IPV6 = 1),
			# padding. Real index 0 means "no real": they start at 1,
			# 1-10 IPv4 (198.18.0.20-29), 11-20 IPv6 (fd00:198:18::20-29).
			for ((i = 0; i < REALS_PER_VIP; i++)); do
				echo "map update pinned $m/reals key $(le32 $((1 + i))) value 198 18 0 $((20 + i)) $(zeros 12) 0 0 0 0"
				echo "map update pinned $m/reals key $(le32 $((1 + REALS_PER_VIP + i))) value 253 0 1 152 0 24 $(zeros 8) 0 $((0x20 + i)) 1 0 0 0"
			done
			# The rings: every slot names a real (a 0 would drop the flow).
			# Katran fills them with its Maglev; the per-packet cost is one
			# array lookup either way.
			awk -v m="$m/ch_rings" -v ring=$RING_SIZE -v n=$REALS_PER_VIP 'BEGIN {
				for (vip = 0; vip < 2; vip++)
					for (i = 0; i < ring; i++) {
						k = vip * ring + i
						printf "map update pinned %s key %d %d %d %d value %d 0 0 0\n", m,
							k % 256, int(k / 256) % 256, int(k / 65536) % 256, int(k / 16777216),
							1 + vip * n + i % n
					}
			}'
		} >"$build/config.batch"
		bpftool batch file "$build/config.batch" >/dev/null
	fi
	echo "pinned ${LABEL[$v]}: $pin/prog" >&2
done

# --- run the bench -------------------------------------------------------------
args=()
((xdp_only)) && args+=(--xdp)
for v in $VARIANTS; do
	args+=(--compare-pinned "${LABEL[$v]}=$BPFFS/katran_$v/prog")
done
cd "$repo"
echo "+ cargo xtask bench ${args[*]} $*" >&2
cargo xtask bench "${args[@]}" "$@"
