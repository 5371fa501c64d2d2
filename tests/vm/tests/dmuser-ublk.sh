#!/bin/bash
# dm-user over ublk: `user` rows served by the Rust daemons (memory, file) and the C daemon
# (built in the guest from the protocol alone) reach the kernel as /dev/ublkbN: mkfs.ext4,
# mount, files read back; kill -9 of a file-backed daemon under a mounted filesystem, a new
# daemon, old and new files read back.
# vm-timeout: 600
. "$USERDM_REPO/tests/vm/lib/cli-lib.sh"
need_ext4
EXAMPLES=$REPO/target/release/examples
[[ -x $EXAMPLES/mem_daemon ]] || fail "$EXAMPLES/mem_daemon missing: cargo build --release --examples"
command -v cc >/dev/null || skip "no C compiler on the host"
cc -std=c11 -O2 -pthread -o "$WORK/c_daemon" "$REPO/crates/userdm-dmuser-daemon/examples/c/mem_daemon.c" ||
	fail "the C daemon does not build"
export USERDM_DMUSER_DIR=$WORK/ctl
size=$((96 << 20))
sectors=$((size / 512))

# diagnose NAME: what the server and the daemons say, when something hangs.
diagnose() {
	echo "--- userdm status $1"
	timeout 10 "$U" status "$1"
	echo "--- daemon logs"
	cat "$WORK/$1.log"
	echo "--- server log"
	cat "$USERDM_RUN_DIR"/devices/*/server.log
}

daemon() { # KIND CTL
	local ep=$USERDM_DMUSER_DIR/$2
	case $1 in
	rust-mem) "$EXAMPLES/mem_daemon" "$ep" "$size" 2 >>"$WORK/$2.log" 2>&1 & ;;
	rust-file) "$EXAMPLES/file_daemon" "$ep" "$WORK/$2.img" 2 >>"$WORK/$2.log" 2>&1 & ;;
	c-file) "$WORK/c_daemon" "$ep" "$WORK/$2.img" 2 >>"$WORK/$2.log" 2>&1 & ;;
	esac
	DAEMON=$!
}

for kind in rust-mem rust-file c-file; do
	name=du-$kind
	truncate -s "$size" "$WORK/$name.img"
	# The user row sits between two memory rows: dm-user's sector numbers are the device's.
	table="0 2048 memory
2048 $((sectors - 4096)) user 0 $((sectors - 4096)) $name
$((sectors - 2048)) 2048 memory"
	dev=$("$U" create "$name" --table "$table")
	[[ $dev == /dev/ublkb* ]] || fail "create $name printed '$dev'"
	[[ -S $USERDM_DMUSER_DIR/$name ]] || fail "no endpoint $USERDM_DMUSER_DIR/$name"
	daemon "$kind" "$name"
	mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4 on a user row served by the $kind daemon"
	mount "$dev" "$MNT" || fail "mount $dev"
	for i in 1 2 3; do head -c $((i * 2000000)) /dev/urandom >"$MNT/f$i"; done
	sync
	(cd "$MNT" && sha256sum f1 f2 f3) >"$WORK/sums"
	echo 3 >/proc/sys/vm/drop_caches
	(cd "$MNT" && sha256sum -c --quiet "$WORK/sums") || fail "files differ through the $kind daemon"
	ok "$kind daemon: ext4 on $dev, files read back"

	if [[ $kind == *-file ]]; then
		# The daemon dies with the filesystem mounted and IO in flight: that IO waits for the
		# next daemon, which serves the same file.
		head -c 8000000 /dev/urandom >"$MNT/during"
		# Writeback starts, then the daemon dies under it.
		sync &
		syncer=$!
		sleep 0.3
		kill -KILL "$DAEMON"
		wait "$DAEMON" 2>/dev/null || true
		daemon "$kind" "$name"
		# A hung request leaves sync in D state, where timeout cannot end it: poll instead.
		for ((i = 0; i < 600; i++)); do kill -0 "$syncer" 2>/dev/null || break; sleep 0.1; done
		if kill -0 "$syncer" 2>/dev/null; then
			echo "in flight: $(cat "/sys/block/${dev#/dev/}/inflight")"
			diagnose "$name"
			fail "sync hangs after the daemon's death"
		fi
		wait "$syncer" || fail "sync failed across the daemon's death"
		"$U" status "$name" | grep user
		"$U" status "$name" | grep -q "channels=2" || fail "the new daemon has no channels"
		(cd "$MNT" && sha256sum during) >>"$WORK/sums"
		timeout 60 umount "$MNT" || { diagnose "$name"; fail "umount hangs after the daemon's death"; }
		mount "$dev" "$MNT" || fail "mount after the new daemon"
		echo 3 >/proc/sys/vm/drop_caches
		(cd "$MNT" && sha256sum -c --quiet "$WORK/sums") || fail "files differ after the daemon's death"
		ok "$kind daemon: kill -9 under a mounted filesystem, new daemon, old and new files read back"
	fi
	umount "$MNT"
	"$U" remove "$name" || fail "remove $name"
	# Removal ends the daemon's reads with ENOTBLK; it exits by itself.
	for ((i = 0; i < 100; i++)); do kill -0 "$DAEMON" 2>/dev/null || break; sleep 0.1; done
	kill -0 "$DAEMON" 2>/dev/null && fail "the $kind daemon did not exit after the removal"
done
echo PASS
