# shellcheck shell=bash disable=SC2034 # REPO, HOST_PACKAGES etc. are used by the scripts that source this
# Shared by tests/vm/run and tests/vm/setup: paths, kernel fetching (private
# apt configuration), initramfs building.  Sourced, never executed.
#
# Cache layout (outside the repo, and outside /tmp, which the guest hides):
#   $CACHE/apt/                 private apt state: sources.list, lists/, archives/
#   $CACHE/kernel-<series>/     root/ (unpacked .debs), kver, vmlinuz, package
#                               names, initrd.cpio + initrd.stamp, modules.log
#   $CACHE/results/<run-id>/<series>/   writable 9p share of one boot
#   $CACHE/lock                 flock(1) lock for fetch/build

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO=$(cd "$VM_DIR/../.." && pwd)
CACHE=${USERDM_VM_CACHE:-/var/cache/userdm-vm}
KERNEL_SERIES_ALL=(6.12 7.3)
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
HOST_PACKAGES=(qemu-system-x86 busybox-static cpio xz-utils zstd fio dmsetup e2fsprogs)

log() { printf 'vm: %s\n' "$*" >&2; }
die() {
	printf 'vm: error: %s\n' "$*" >&2
	exit 1
}

# The guest mounts tmpfs over /tmp and /run of the host root: anything the
# guest must see has to live elsewhere.
check_guest_visible() { # WHAT PATH
	case "$2/" in
	/tmp/* | /run/* | /proc/* | /sys/* | /dev/*)
		die "$1 ($2) is under /tmp, /run, /proc, /sys or /dev, which the guest cannot see; move it (e.g. USERDM_VM_CACHE=/var/cache/userdm-vm)"
		;;
	esac
}

# Which Debian suite, package name patterns and kernel flavour make up each
# series.  The ABI number (6.12.NN+debNN) is picked from the apt cache.
series_suite() {
	case "$1" in
	6.12) echo bookworm-backports ;;
	7.3) echo trixie-backports ;;
	*) die "unknown kernel series '$1' (known: ${KERNEL_SERIES_ALL[*]})" ;;
	esac
}
# Regex over package names: the image package(s) for one ABI; ABI is group 1.
series_image_regex() {
	case "$1" in
	6.12) echo '^linux-image-(6\.12\.[0-9]+\+deb12(\.[0-9]+)?)-amd64-unsigned$' ;;
	7.3) echo '^linux-binary-(7\.3\.[0-9]+\+deb13(\.[0-9]+)?)-amd64$' ;;
	esac
}
# The packages to download for one ABI (e.g. "6.12.95+deb12").
series_packages() { # SERIES ABI
	case "$1" in
	6.12) echo "linux-image-$2-amd64-unsigned" ;;
	# linux-base has modules.order and modules.builtin
	7.3) echo "linux-binary-$2-amd64 linux-modules-$2-amd64 linux-base-$2-amd64" ;;
	esac
}

# ---------------------------------------------------------------- apt ----

# The Debian mirror this machine already uses, from its own apt configuration.
mirror_uri() {
	local f=/etc/apt/sources.list.d/debian.sources uri=
	if [[ -r $f ]]; then
		# deb822: first URIs: value that is not the security archive.
		uri=$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' "$f")
	fi
	if [[ -z $uri && -r /etc/apt/sources.list ]]; then
		# one-line format: deb [options] URI suite components...
		uri=$(sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]].*/\2/p' /etc/apt/sources.list |
			grep -v security | head -n1 || true)
	fi
	[[ -n $uri ]] || die "no Debian mirror URI found in $f (URIs: line) nor in /etc/apt/sources.list (deb line)"
	echo "${uri%/}"
}

APT_OPTS=()
apt_private_init() {
	local uri
	uri=$(mirror_uri)
	[[ -r $DEBIAN_KEYRING ]] || die "Debian archive keyring $DEBIAN_KEYRING missing (apt-get install debian-archive-keyring)"
	mkdir -p "$CACHE/apt/lists/partial" "$CACHE/apt/archives/partial"
	local list="$CACHE/apt/sources.list" suite new
	new=$(for s in "${KERNEL_SERIES_ALL[@]}"; do
		suite=$(series_suite "$s")
		echo "deb [signed-by=$DEBIAN_KEYRING] $uri $suite main"
	done)
	[[ -f $list && $(cat "$list") == "$new" ]] || printf '%s\n' "$new" >"$list"
	APT_OPTS=(
		-o "Dir::Etc::SourceList=$list"
		-o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$CACHE/apt/lists"
		-o "Dir::Cache::archives=$CACHE/apt/archives"
		-o "Dir::Etc::Trusted=$DEBIAN_KEYRING"
		-o Dir::Etc::TrustedParts=/dev/null
		-o Dir::Etc::Preferences=/dev/null
		-o Dir::Etc::PreferencesParts=/dev/null
		-o Dir::Cache::pkgcache=
		-o Dir::Cache::srcpkgcache=
		-o Acquire::Languages=none
		-o APT::Update::Post-Invoke::=
		-o Debug::NoLocking=1
	)
}

apt_private_update() {
	log "apt-get update (private configuration, lists in $CACHE/apt/lists)"
	apt-get "${APT_OPTS[@]}" -q update >"$CACHE/apt/update.log" 2>&1 ||
		{
			tail -n 20 "$CACHE/apt/update.log" >&2
			die "apt-get update with the private sources list $CACHE/apt/sources.list failed (log: $CACHE/apt/update.log)"
		}
}

# Prints the newest ABI (e.g. 6.12.95+deb12) of SERIES that has a candidate
# version for every package it needs.
newest_abi() { # SERIES
	local series=$1 re abi pkg ok
	re=$(series_image_regex "$series")
	while read -r abi; do
		ok=1
		for pkg in $(series_packages "$series" "$abi"); do
			# (not "| grep -q": with pipefail, apt-cache's SIGPIPE would count as failure)
			if [[ $(apt-cache "${APT_OPTS[@]}" policy "$pkg" 2>/dev/null) != *"Candidate: "[0-9]* ]]; then
				ok=
				break
			fi
		done
		if [[ -n $ok ]]; then
			echo "$abi"
			return 0
		fi
	done < <(apt-cache "${APT_OPTS[@]}" pkgnames "$(series_image_regex_prefix "$series")" |
		sed -E -n "s/$re/\\1/p" | sort -rV)
	return 1
}
series_image_regex_prefix() {
	case "$1" in
	6.12) echo linux-image-6.12. ;;
	7.3) echo linux-binary-7.3. ;;
	esac
}

# ------------------------------------------------------------- kernels ----

kdir() { echo "$CACHE/kernel-$1"; }

# Bump when what kernel_fetch leaves in the cache changes: forces a refetch.
KERNEL_CACHE_FORMAT=2
kernel_ready() { [[ $(cat "$(kdir "$1")/READY" 2>/dev/null) == "$KERNEL_CACHE_FORMAT" ]]; }

# Fetch and unpack one series, unless already cached (or REFRESH=1 and a newer
# ABI exists).  No apt at all when cached.
kernel_fetch() { # SERIES
	local series=$1 kd abi pkgs pkg deb
	kd=$(kdir "$series")
	if kernel_ready "$series" && [[ ${REFRESH:-0} != 1 ]]; then
		return 0
	fi
	command -v apt-get >/dev/null || die "apt-get not found: cannot fetch Debian kernels"
	[[ ${#APT_OPTS[@]} -gt 0 ]] || {
		apt_private_init
		apt_private_update
	}
	abi=$(newest_abi "$series") ||
		die "no linux $series package for amd64 found in $(series_suite "$series") (pattern $(series_image_regex "$series")); see $CACHE/apt/update.log"
	if kernel_ready "$series" && [[ $(cat "$kd/abi") == "$abi" ]]; then
		log "kernel $series: $abi already cached"
		return 0
	fi
	read -r -a pkgs <<<"$(series_packages "$series" "$abi")"
	log "kernel $series: downloading ${pkgs[*]}"
	(cd "$CACHE/apt/archives" && apt-get "${APT_OPTS[@]}" -q download "${pkgs[@]}" >"$CACHE/apt/download-$series.log" 2>&1) ||
		{
			tail -n 20 "$CACHE/apt/download-$series.log" >&2
			die "apt-get download ${pkgs[*]} failed"
		}
	rm -rf "$kd.new"
	mkdir -p "$kd.new/root"
	for pkg in "${pkgs[@]}"; do
		deb=$(find "$CACHE/apt/archives" -maxdepth 1 -name "${pkg//+/%2b}_*.deb" -o -maxdepth 1 -name "${pkg}_*.deb" | sort -V | tail -n1 || true)
		[[ -n $deb ]] || die "downloaded package $pkg not found in $CACHE/apt/archives"
		log "kernel $series: unpacking $(basename "$deb")"
		dpkg-deb -x "$deb" "$kd.new/root" || die "dpkg-deb -x $deb failed"
	done
	local vmlinuz kver
	vmlinuz=$(find "$kd.new/root/boot" "$kd.new/root/usr/lib/modules" "$kd.new/root/lib/modules" \
		-maxdepth 2 -name 'vmlinuz*' -type f 2>/dev/null | head -n1 || true)
	[[ -n $vmlinuz ]] || die "no vmlinuz in ${pkgs[*]}"
	kver=$(find "$kd.new/root/lib/modules" "$kd.new/root/usr/lib/modules" -mindepth 1 -maxdepth 1 \
		-type d -name "$series.*" 2>/dev/null | head -n1 || true)
	[[ -n $kver ]] || die "no modules directory for $series in ${pkgs[*]}"
	echo "${vmlinuz#"$kd.new/"}" >"$kd.new/vmlinuz"
	echo "${kver#"$kd.new/"}" >"$kd.new/moddir"
	basename "$kver" >"$kd.new/kver"
	echo "$abi" >"$kd.new/abi"
	printf '%s\n' "${pkgs[@]}" >"$kd.new/packages"
	echo "$KERNEL_CACHE_FORMAT" >"$kd.new/READY"
	rm -rf "$kd"
	mv "$kd.new" "$kd"
	# Only the unpacked tree is used from now on.
	for pkg in "${pkgs[@]}"; do
		rm -f "$CACHE/apt/archives/${pkg}"_*.deb "$CACHE/apt/archives/${pkg//+/%2b}"_*.deb
	done
	log "kernel $series: $(cat "$kd/kver") ready in $kd"
}

# ----------------------------------------------------------- initramfs ----

# Modules for the initramfs, in load order (dependencies from modules.dep are
# added before the module that needs them).  "name[ args]".
INITRD_MODULES=(
	configfs
	netfs 9pnet 9pnet_virtio 9p
	ublk_drv
	dm-mod
	dm-zero dm-delay dm-flakey dm-bufio dm-snapshot dm-log dm-region-hash dm-mirror
	dm-log-writes dm-unstripe dm-crypt dm-dust
	nbd loop cuse
	"null_blk nr_devices=0"
	ext4 # (and its dependencies) for tests that put a filesystem on a device
)

# Resolve INITRD_MODULES against the kernel's modules.order/modules.builtin
# (Debian ships no modules.dep: depmod runs at install time).  Dependencies are
# read from each module's own "depends=" modinfo string and loaded first.
# Prints "relpath args" lines in load order; notes go to modules.log.
resolve_modules() { # SERIES
	local kd moddir
	kd=$(kdir "$1")
	moddir="$kd/$(cat "$kd/moddir")"
	printf '%s\n' "${INITRD_MODULES[@]}" | perl -e '
		use strict; use warnings;
		my ($moddir, $log) = @ARGV;
		open(my $L, ">", $log) or die "$log: $!";
		my (%path, %builtin);
		sub norm { my $n = shift; $n =~ s{.*/}{}; $n =~ s/\.ko(\..*)?$//; $n =~ tr/-/_/; return $n; }
		my @order;
		if (open(my $O, "<", "$moddir/modules.order")) { @order = <$O>; }
		else { @order = map { s{^\Q$moddir\E/}{}r } split /\n/, `find "$moddir/kernel" -name "*.ko*"`; }
		for my $m (@order) {
			chomp $m;
			for my $ext ("", ".xz", ".zst", ".gz") {
				if (-f "$moddir/$m$ext") { $path{norm($m)} = "$m$ext"; last; }
			}
		}
		if (open(my $B, "<", "$moddir/modules.builtin")) {
			while (<$B>) { chomp; $builtin{norm($_)} = 1; }
		}
		sub depends {
			my $rel = shift; my $f = "$moddir/$rel"; my $fh;
			if ($rel =~ /\.xz$/) { open($fh, "-|", "xz", "-dc", $f) or die; }
			elsif ($rel =~ /\.zst$/) { open($fh, "-|", "zstd", "-qdc", $f) or die; }
			elsif ($rel =~ /\.gz$/) { open($fh, "-|", "gzip", "-dc", $f) or die; }
			else { open($fh, "<", $f) or die "$f: $!"; }
			binmode $fh; local $/; my $data = <$fh>; close $fh or die "cannot decompress $f\n";
			return $data =~ /\0depends=([^\0]*)\0/ ? grep { length } split(/,/, $1) : ();
		}
		my (%done, @out);
		sub add {
			my ($n, $args, $why) = @_;
			return if $done{$n}++;
			if (!$path{$n}) {
				if ($builtin{$n}) { print $L "$n: built into the kernel\n"; }
				else { print $L "$n: not available in this kernel (skipped)$why\n"; }
				return;
			}
			add(norm($_), "", " (needed by $n)") for depends($path{$n});
			push @out, "$path{$n} $args";
		}
		while (<STDIN>) {
			chomp; my ($name, $args) = split " ", $_, 2;
			add(norm($name), $args // "", "");
		}
		print "$_\n" for @out;
	' "$moddir" "$kd/modules.log" || die "resolving modules of kernel $1 failed"
}

initrd_path() { echo "$(kdir "$1")/initrd.cpio"; }

# Build (or reuse) the initramfs of SERIES: busybox + decompressed modules +
# lib/init.  Rebuilt when any input changes.
initrd_build() { # SERIES
	local series=$1 kd busybox stamp mods
	kd=$(kdir "$series")
	kernel_ready "$series" || die "kernel $series not fetched (run tests/vm/setup)"
	busybox=/bin/busybox
	[[ -x $busybox ]] || die "busybox not found at $busybox (apt-get install busybox-static)"
	# The initramfs has no libc: busybox must be the static build.
	[[ $(LC_ALL=C ldd "$busybox" 2>&1 || true) == *"not a dynamic executable"* ]] ||
		die "$busybox is dynamically linked; the initramfs needs busybox-static (apt-get install busybox-static)"
	# inputs: the kernel, /init, busybox, this file (which has INITRD_MODULES)
	stamp=$( {
		cat "$kd/kver"
		sha256sum "$VM_DIR/lib/init" "$busybox" "${BASH_SOURCE[0]}"
	} | sha256sum | cut -d' ' -f1)
	if [[ -f $kd/initrd.cpio && -f $kd/initrd.stamp && $(cat "$kd/initrd.stamp") == "$stamp" ]]; then
		return 0
	fi
	mods=$(resolve_modules "$series")
	log "kernel $series: building initramfs"
	local work="$kd/initrd.work" rel args name n=0
	rm -rf "$work"
	mkdir -p "$work"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,host,modules,etc}
	cp "$busybox" "$work/bin/busybox"
	cp "$VM_DIR/lib/init" "$work/init"
	chmod 755 "$work/init"
	: >"$work/etc/modules"
	while read -r rel args; do
		[[ -n $rel ]] || continue
		name=$(basename "$rel")
		name=${name%%.ko*}
		n=$((n + 1))
		local dst
		dst="$work/modules/$(printf '%02d' "$n")-$name.ko"
		case "$rel" in
		*.ko.xz) xz -dc "$kd/$(cat "$kd/moddir")/$rel" >"$dst" ;;
		*.ko.zst) zstd -q -dc "$kd/$(cat "$kd/moddir")/$rel" >"$dst" ;;
		*.ko.gz) gzip -dc "$kd/$(cat "$kd/moddir")/$rel" >"$dst" ;;
		*.ko) cp "$kd/$(cat "$kd/moddir")/$rel" "$dst" ;;
		*) die "unknown module compression: $rel" ;;
		esac
		echo "$(basename "$dst") $args" >>"$work/etc/modules"
	done <<<"$mods"
	cp "$kd/modules.log" "$work/etc/modules.notes"
	(cd "$work" && find . -print0 | sort -z | cpio --null -o -H newc --quiet) >"$kd/initrd.cpio.new" ||
		die "cpio failed building $kd/initrd.cpio"
	mv "$kd/initrd.cpio.new" "$kd/initrd.cpio"
	rm -rf "$work"
	echo "$stamp" >"$kd/initrd.stamp"
	log "kernel $series: initramfs $(du -h "$kd/initrd.cpio" | cut -f1) with $n modules"
}

with_cache_lock() { # CMD...
	mkdir -p "$CACHE" || die "cannot create cache directory $CACHE (set USERDM_VM_CACHE)"
	(
		flock 9 || die "cannot lock $CACHE/lock"
		"$@"
	) 9>"$CACHE/lock"
}
