# shellcheck shell=bash
# Helpers shared by the cli-*.sh VM tests (the userdm CLI serving devices over ublk); sourced,
# never run. On top of ublk-lib.sh: $U (the userdm binary), a private run directory, and a
# cleanup that removes every userdm device before ublk-lib's own.
# shellcheck source=../tests/ublk-lib.sh
. "$USERDM_REPO/tests/vm/tests/ublk-lib.sh"

U=${USERDM_BIN:-$REPO/target/release/userdm}
[[ -x $U ]] || fail "$U missing: run 'cargo build --release -p userdm' on the host first"
export USERDM_RUN_DIR=$WORK/run
MNT=$WORK/mnt
mkdir -p "$MNT"

cli_cleanup() {
	set +e
	for job in $(jobs -p); do kill -KILL "$job" 2>/dev/null; done
	wait 2>/dev/null
	# Error tables first: IO held for a dead daemon or server fails instead of hanging the
	# umounts below.
	timeout 60 "$U" remove_all --force >/dev/null 2>&1
	for m in $(awk '$1 ~ /^\/dev\/(ublkb|mapper|dm-)/ { print $2 }' /proc/mounts | sort -r); do
		umount -l "$m" 2>/dev/null
	done
	dmsetup remove_all --force >/dev/null 2>&1
	timeout 60 "$U" remove_all --force >/dev/null 2>&1
	cleanup
}
trap cli_cleanup EXIT

# expect_fail RC PATTERN CMD...: CMD must exit with RC and say PATTERN (grep -E, any case)
# on stderr.
expect_fail() {
	local want=$1 pattern=$2 rc=0
	shift 2
	"$@" >"$WORK/out" 2>"$WORK/err" || rc=$?
	[[ $rc -eq $want ]] || fail "'$*' exited $rc, not $want: $(cat "$WORK/err")"
	grep -qiE "$pattern" "$WORK/err" || fail "'$*' did not say /$pattern/: $(cat "$WORK/err")"
	echo "refused as expected ($rc): $*: $(head -n1 "$WORK/err")"
}

# open_count NAME: the Open count line of `userdm info`.
open_count() {
	"$U" info "$1" | sed -n 's/^Open count: *//p'
}

# wait_gone NAME: waits (up to 20 s) until the device is no longer listed.
wait_gone() {
	local i
	for ((i = 0; i < 200; i++)); do
		"$U" info "$1" >/dev/null 2>&1 || return 0
		sleep 0.1
	done
	fail "device $1 is still there after 20 s"
}

# verify_fio NAME DEV [ARGS...]: random writes then verification with crc32c.
verify_fio() {
	local name=$1 dev=$2
	shift 2
	fio_run "$name" --filename="$dev" --ioengine=io_uring --direct=1 --rw=randwrite \
		--bsrange=4k-128k --size=24M --iodepth=32 --numjobs=1 --verify=crc32c \
		--verify_fatal=1 --do_verify=1 --randrepeat=0 "$@"
}
