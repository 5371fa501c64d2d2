#!/bin/bash
# ublk: bad input gives a clear error: unknown flag, missing backing file, a kernel without
# ublk (simulated with a missing control device), features the kernel lacks, bad ids.
. "$(dirname "$0")/ublk-lib.sh"

expect() { # WANT_RC PATTERN ARGS...
	local want=$1 pattern=$2 out rc=0
	shift 2
	out=$(timeout 30 "$UBLK_SERVE" "$@" 2>&1) || rc=$?
	echo "\$ ublk-serve $* -> $rc: $out"
	[[ $rc -eq $want ]] || fail "exit status $rc, expected $want"
	grep -q -- "$pattern" <<<"$out" || fail "message lacks '$pattern'"
}

expect 2 "unknown option '--bogus'" --bogus
expect 2 "needs a number" --depth lots
expect 1 "cannot open backing file '/nonexistent/disk.img'" --backend file --file /nonexistent/disk.img
expect 1 "the kernel has no ublk: /nonexistent/ublk-control does not exist; try 'modprobe ublk_drv'" \
	--control /nonexistent/ublk-control
expect 1 "try 'modprobe ublk_drv'" --control /nonexistent/ublk-control --list
expect 1 "invalid ublk option: depth must be" --depth 0
expect 1 "need_get_data cannot be combined" --need-get-data --user-copy
expect 1 "no ublk device 4000" --recover 4000
expect 1 "no ublk device 4000" --delete 4000
if ! kernel_at_least 6 16; then
	expect 1 "lacks zero copy by automatic buffer registration (UBLK_F_AUTO_BUF_REG, Linux 6.16 or later)" --zero-copy
fi
[[ -z $(ls /dev/ublkc* 2>/dev/null) ]] || fail "a failed start left a device behind: $(ls /dev/ublkc*)"
ok "every bad input failed cleanly and left no device"
echo PASS
