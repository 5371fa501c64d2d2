# shellcheck shell=bash
# The device-mapper CLI cases, shared by tests/vm/tests/dmsetup-oracle.sh
# (runs them with dmsetup on the kernel's device-mapper) and
# tests/vm/tests/userdm-conformance.sh (runs them with the userdm CLI): one
# list, so the two cannot drift.  Sourced, never executed.
#
#   dm_cases_prepare           two 64 MiB loop devices A and B (once per boot)
#   dm_cases_run TOOL OUTDIR   run every case with TOOL in place of dmsetup
#   dm_cases_cleanup           detach the loop devices
#
# OUTDIR gets, per case NAME:
#   raw/NAME.txt   every command of the case with its exact stdout and stderr
#                  bytes and exit code (the command is shown with "dmsetup")
#   norm/NAME.txt  the same with device numbers and library versions replaced
#                  by placeholders (what the conformance test compares)
#   kmsg/NAME.txt  what the kernel logged during the case (timestamps removed)
# and expect-failures.txt listing commands whose exit code was not the one
# the case list expects (x0: must succeed, x1: must fail, x: anything).
# Cases are written as: c NAME, then x/x0/x1/xt/xbg+xjoin commands (TOOL
# ARGS), plain shell in between (hold/release, wait_gone).
#
# Record format of one command:
#   $ dmsetup ARGS...        (printf %q quoting)
#   --- stdout               (only when there was output; likewise stderr)
#   BYTES
#   \ no newline at end      (when the output did not end with a newline)
#   --- exit N

DM_CASES_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DM_WORK=/run/dm-cases
DM_A='' DM_B=''         # loop device paths
DM_A_NUM='' DM_B_NUM='' # their major:minor
# dmsetup's ls --tree draws with UTF-8 line characters under a UTF-8 locale
export LC_ALL=C
_dm_kmsg_pid=''

# Every exec costs ~0.1 s in the emulated guest, so the recorder runs nothing
# but the tool under test per command: outputs go to numbered files and one
# perl process (dm-assemble) writes raw/ norm/ kmsg/ at the end.

dm_cases_prepare() {
	mkdir -p "$DM_WORK"
	truncate -s 64M "$DM_WORK/a.img" "$DM_WORK/b.img"
	DM_A=$(losetup -f --show "$DM_WORK/a.img")
	DM_B=$(losetup -f --show "$DM_WORK/b.img")
	DM_A_NUM=$(($(stat -c '0x%t' "$DM_A"))):$(($(stat -c '0x%T' "$DM_A")))
	DM_B_NUM=$(($(stat -c '0x%t' "$DM_B"))):$(($(stat -c '0x%T' "$DM_B")))
	echo "loop devices: A=$DM_A ($DM_A_NUM) B=$DM_B ($DM_B_NUM)"
	# the kernel log, split per case by the markers c() writes
	cat /dev/kmsg >"$DM_WORK/kmsg.log" 2>/dev/null &
	_dm_kmsg_pid=$!
}

dm_cases_cleanup() {
	[[ -z $_dm_kmsg_pid ]] || kill "$_dm_kmsg_pid" 2>/dev/null || true
	[[ -z $DM_A ]] || losetup -d "$DM_A" 2>/dev/null || true
	[[ -z $DM_B ]] || losetup -d "$DM_B" 2>/dev/null || true
	rm -rf "$DM_WORK"
}

# ------------------------------------------------------------ recording ----

_dm_case='' _dm_out='' _dm_tool='' _dm_dir='' _dm_n=0 _dm_ncase=0
_dm_expect_failures=()

_dm_kmark() { echo "<7>dm-cases: $*" >/dev/kmsg 2>/dev/null || true; }

# c NAME: start a case.  Every case starts with no devices (remove_all
# --force of the tool under test, not recorded) and no open descriptors.
c() {
	exec 3<&- 4<&-
	"$_dm_tool" remove_all --force >/dev/null 2>&1 || true
	_dm_case=$1 _dm_n=0 _dm_ncase=$((_dm_ncase + 1))
	printf -v _dm_dir '%s/parts/%03d-%s' "$_dm_out" "$_dm_ncase" "$_dm_case"
	mkdir "$_dm_dir"
	_dm_kmark "begin $_dm_case"
	echo "case $_dm_case (at ${SECONDS}s)"
}

# _dm_exec EXPECT PREFIX... -- ARGS...: run [PREFIX...] TOOL ARGS, record it.
_dm_exec() {
	local expect=$1 rc=0 p cmd
	shift
	local prefix=()
	while [[ $1 != -- ]]; do
		prefix+=("$1")
		shift
	done
	shift
	_dm_n=$((_dm_n + 1))
	printf -v p '%s/%03d' "$_dm_dir" "$_dm_n"
	# DM_CASES_CMD_TIMEOUT (unrecorded) keeps a hanging tool from eating the
	# whole test's time; the conformance test sets it for userdm.
	local guard=()
	[[ -z ${DM_CASES_CMD_TIMEOUT:-} ]] || guard=(timeout -k 5 "$DM_CASES_CMD_TIMEOUT")
	"${guard[@]}" "${prefix[@]}" "$_dm_tool" "$@" >"$p.out" 2>"$p.err" <"$DM_WORK/stdin" || rc=$?
	: >"$DM_WORK/stdin"
	cmd="${prefix[*]}${prefix[*]:+ }dmsetup"
	printf -v cmd '%s%s' "$cmd" "$(printf ' %q' "$@")"
	printf '%s\n' "$cmd" >"$p.cmd"
	printf '%d\n' "$rc" >"$p.rc"
	if [[ $expect == 0 && $rc -ne 0 ]] || [[ $expect == 1 && $rc -eq 0 ]]; then
		_dm_expect_failures+=("$_dm_case: expected $([[ $expect == 0 ]] && echo success || echo failure), got exit $rc: $cmd")
		echo "${_dm_expect_failures[-1]}"
	fi
	return 0
}
x() { _dm_exec - -- "$@"; }  # run, any exit code
x0() { _dm_exec 0 -- "$@"; } # must succeed
x1() { _dm_exec 1 -- "$@"; } # must fail
# xt SECS ARGS: run under timeout(1): exit 124 when SIGTERM ended it, 137
# when it ignored SIGTERM and needed SIGKILL one second later.
xt() {
	local secs=$1
	shift
	_dm_exec - timeout -k 1 "$secs" -- "$@"
}
# xstdin TEXT: feed TEXT to the stdin of the next recorded command
xstdin() { printf '%s\n' "$1" >"$DM_WORK/stdin"; }

# Background command (for wait): xbg ARGS; ...; xjoin records it.
_dm_bg_pid='' _dm_bg_p=''
xbg() {
	_dm_n=$((_dm_n + 1))
	printf -v _dm_bg_p '%s/%03d' "$_dm_dir" "$_dm_n"
	printf 'dmsetup%s &   (run in the background, joined later)\n' "$(printf ' %q' "$@")" >"$_dm_bg_p.cmd"
	"$_dm_tool" "$@" >"$_dm_bg_p.out" 2>"$_dm_bg_p.err" </dev/null &
	_dm_bg_pid=$!
	sleep 1 # let it block in the kernel (or the daemon) first
}
xjoin() {
	local rc=0 i
	for ((i = 0; i < 100; i++)); do
		kill -0 "$_dm_bg_pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$_dm_bg_pid" 2>/dev/null; then
		kill -9 "$_dm_bg_pid" 2>/dev/null || true
		echo "(harness: still blocked 10 s later, killed)" >>"$_dm_bg_p.err"
	fi
	wait "$_dm_bg_pid" || rc=$?
	printf '%d\n' "$rc" >"$_dm_bg_p.rc"
}

# hold NAME: keep /dev/mapper/NAME open (fd 3) until release or the next
# case.  Not recorded when it works (the oracle has no line for it); when the
# open fails, that is recorded, so a tool without the node shows up as a diff.
hold() {
	if ! { exec 3<"/dev/mapper/$1"; } 2>/dev/null; then
		_dm_n=$((_dm_n + 1))
		local p
		printf -v p '%s/%03d' "$_dm_dir" "$_dm_n"
		printf '(harness) exec 3</dev/mapper/%s\n' "$1" >"$p.cmd"
		printf 'cannot open /dev/mapper/%s\n' "$1" >"$p.err"
		echo 1 >"$p.rc"
	fi
}
release() { exec 3<&-; }

# Wait (unrecorded, up to 20 s) until NAME is gone, e.g. after a deferred remove.
wait_gone() {
	local i
	for ((i = 0; i < 200; i++)); do
		"$_dm_tool" info "$1" >/dev/null 2>&1 || return 0
		sleep 0.1
	done
}

# ---------------------------------------------------------------- cases ----

dm_cases_run() { # TOOL OUTDIR
	_dm_tool=$1 _dm_out=$2 _dm_ncase=0 _dm_expect_failures=()
	[[ -n $DM_A ]] || dm_cases_prepare
	rm -rf "$_dm_out"
	mkdir -p "$_dm_out/parts"
	: >"$DM_WORK/stdin"
	local A=$DM_A B=$DM_B
	local T0="0 2048 zero
2048 2048 error
4096 8192 linear $A 0
12288 8192 striped 2 128 $A 16384 $B 0"

	# The session of dmsetup-output-6.12.md, command for command.
	c reference
	x0 create t0 --table "$T0"
	x0 create t1 --table "0 8192 delay $A 0 50"
	x0 create t2 --table "0 8192 flakey $B 0 5 5"
	x0 create t3 --notable
	x0 version
	x0 targets
	x0 ls
	x0 info t0
	x0 info t3
	x0 info -c
	x0 table
	x0 status
	x0 deps t0
	x0 ls --tree
	x0 suspend t1
	x0 info t1
	x0 resume t1
	x0 load t2 --table "0 8192 zero"
	x0 info t2
	x0 table --inactive t2
	x0 resume t2
	x0 info t2
	x1 create bad --table "0 100 nosuch"
	x1 create bad2 --table "0 100 zero
200 100 zero"
	x1 message t2 0 foo
	x0 remove_all
	x ls

	c version
	x0 version
	c targets
	x0 targets
	c ls-empty
	x ls
	x info
	x table
	x status
	x deps
	x info -c

	c create-exists
	x0 create t0 --table "0 100 zero"
	x1 create t0 --table "0 200 zero"
	x0 table t0
	x0 ls
	c create-notable
	x0 create t3 --notable
	x0 table t3
	x0 status t3
	x0 deps t3
	x0 info t3
	x resume t3
	x0 info t3
	c create-stdin
	xstdin "0 100 zero
100 100 error"
	x0 create t0
	x0 table t0
	c create-uuid
	x0 create t0 --uuid userdm-test-uuid-0 --table "0 100 zero"
	x0 info t0
	x0 info -c t0
	x1 create t1 --uuid userdm-test-uuid-0 --table "0 100 zero"
	x0 ls
	c create-readonly
	x0 create r0 --readonly --table "0 2048 linear $A 0"
	x0 info r0
	x0 info -c r0
	x0 table r0
	x0 status r0

	c remove-missing
	x1 remove nosuch
	x1 info nosuch
	x1 table nosuch
	x1 status nosuch
	x1 deps nosuch
	x1 suspend nosuch
	x1 resume nosuch
	x1 load nosuch --table "0 100 zero"
	x1 clear nosuch
	x1 rename nosuch other
	x1 message nosuch 0 foo
	x1 setgeometry nosuch 1 1 1 0
	x1 wait nosuch

	c load-gap
	x0 create t0 --notable
	x1 load t0 --table "0 100 zero
200 100 zero"
	x0 info t0
	c load-overlap
	x0 create t0 --notable
	x1 load t0 --table "0 100 zero
50 100 zero"
	x0 info t0
	c load-not-at-zero
	x0 create t0 --notable
	x1 load t0 --table "10 100 zero"
	x0 info t0
	c load-zero-length
	x0 create t0 --notable
	x1 load t0 --table "0 0 zero"
	c load-inactive-clear
	x0 create t0 --table "0 100 zero"
	x0 load t0 --table "0 200 error"
	x0 info t0
	x0 table t0
	x0 table --inactive t0
	x0 status --inactive t0
	x0 info -c t0
	x0 clear t0
	x0 info t0
	x0 table --inactive t0
	x0 clear t0

	# Wrong parameter counts and values for every target the kernel has.
	local bad
	while IFS='|' read -r name bad; do
		[[ -n $name ]] || continue
		c "badparams-$name"
		x create bad --table "$bad"
		x0 ls
	done <<EOF
zero|0 100 zero 1
error|0 100 error 1 2 3
linear-short|0 100 linear $A
linear-long|0 100 linear $A 0 5
linear-nodev|0 100 linear /dev/nosuch 0
linear-offset|0 100 linear $A notanumber
striped-short|0 256 striped 2 128 $A 0
striped-chunk|0 280 striped 2 7 $A 0 $B 0
striped-length|0 100 striped 2 128 $A 0 $B 0
striped-zero|0 256 striped 0 128
delay-short|0 100 delay $A 0
delay-long|0 100 delay $A 0 50 $B
flakey-short|0 100 flakey $B 0 5
flakey-features|0 100 flakey $B 0 5 5 2 drop_writes
flakey-unknown|0 100 flakey $B 0 5 5 1 nosuch
crypt|0 100 crypt aes-xts-plain64
mirror|0 100 mirror core 1
snapshot|0 100 snapshot $A
snapshot-origin|0 100 snapshot-origin
unstriped|0 100 unstriped 2
log-writes|0 100 log-writes $A
nosuch|0 100 nosuch
EOF

	c status-each-target
	x0 create tl --table "0 2048 linear $A 2048"
	x0 create ts --table "0 4096 striped 2 64 $A 0 $B 0"
	x0 create td --table "0 2048 delay $A 0 10 $B 0 20"
	x0 create tf --table "0 2048 flakey $B 0 3 1"
	x0 create tz --table "0 2048 zero"
	x0 create te --table "0 2048 error"
	x0 status
	x0 table
	x0 status tl
	x0 status ts
	x0 status td
	x0 status tf
	x0 status tz
	x0 status te
	x0 status --target linear
	x0 status --target striped
	x0 table --target flakey
	x0 table --target delay
	x0 ls --target linear
	x0 ls --target zero
	x0 ls --target nosuch
	x0 info -c
	x0 deps
	x0 ls --tree

	# flakey feature arguments, each in a device of its own
	local feat
	while IFS='|' read -r name feat; do
		[[ -n $name ]] || continue
		c "flakey-$name"
		x create f --table "0 8192 flakey $B 0 5 5 $feat"
		x table f
		x status f
	done <<'EOF'
none|0
drop-writes|1 drop_writes
error-writes|1 error_writes
error-reads|1 error_reads
error-reads-writes|2 error_reads error_writes
drop-and-error|2 drop_writes error_writes
corrupt-bio-byte|5 corrupt_bio_byte 32 r 1 0
corrupt-bio-byte-badcount|3 corrupt_bio_byte 32 r 1 0
corrupt-bio-byte-write|5 corrupt_bio_byte 1 w 255 0
ignore-zero|1 ignore_zero
random-read-corrupt|2 random_read_corrupt 500000000
random-write-corrupt|2 random_write_corrupt 1000000000
EOF

	c info-columns
	x0 create t0 --table "$T0"
	x0 create t1 --uuid uuid-t1 --table "0 8192 delay $A 0 50"
	x0 create t3 --notable
	x0 info -c
	x0 info -c --noheadings
	x0 info -c -o name,major,minor,attr,open,segments,events,uuid
	x0 info -c -o name --sort name
	x0 info
	x0 ls
	x0 ls -o blkdevname
	x0 ls --tree -o ascii

	c deps
	x0 create t0 --table "$T0"
	x0 create t1 --table "0 8192 linear $A 0"
	x0 create t2 --notable
	x0 deps t0
	x0 deps t1
	x0 deps t2
	x0 deps
	x0 deps -o devname t0
	x0 deps -o blkdevname t0

	c suspended
	x0 create t0 --table "0 8192 linear $A 0"
	x0 suspend t0
	x0 info t0
	x0 table t0
	x0 status t0
	x0 info -c t0
	x0 suspend t0
	x0 info t0
	x0 resume t0
	x0 resume t0
	x0 info t0
	x0 suspend --nolockfs --noflush t0
	x0 info t0
	x0 resume t0

	c rename
	x0 create t0 --table "0 100 zero"
	x0 create t9 --notable
	x0 info t0
	x0 rename t0 t1
	x0 info t1
	x1 info t0
	x0 rename t1 t2
	x0 info t2
	x0 ls
	x1 rename t2 t9
	x1 rename nosuch t5
	x0 rename t9 t8
	x0 info t8
	x0 info -c

	c rename-suspended
	x0 create t0 --table "0 100 zero"
	x0 suspend t0
	x0 rename t0 t1
	x0 info t1
	x0 resume t1
	x0 info t1

	c event-after-load-resume
	x0 create t0 --table "0 100 zero"
	x0 load t0 --table "0 200 zero"
	x0 resume t0
	x0 info t0
	x message t0 0 foo
	x0 info t0

	c wait
	x0 create t0 --table "0 100 zero"
	xt 3 wait t0
	xt 3 wait t0 0
	x0 rename t0 t1
	x0 info t1
	xt 30 wait t1
	xt 30 wait t1 0
	xt 3 wait t1 1
	xt 30 wait t1 5
	xt 30 wait -v t1 0
	c wait-wakeup
	x0 create t0 --table "0 100 zero"
	xbg wait t0 0
	x0 rename t0 t1
	xjoin
	x0 info t1
	c wait-notable
	x0 create t0 --notable
	xt 3 wait t0
	x0 rename t0 t1
	x0 info t1
	xt 3 wait t1 0

	c message
	x0 create tz --table "0 100 zero"
	x0 create tl --table "0 100 linear $A 0"
	x0 create te --table "0 100 error"
	x0 create tf --table "0 100 flakey $B 0 5 5"
	x0 create td --table "0 100 delay $A 0 0"
	x0 create ts --table "0 256 striped 2 128 $A 0 $B 0"
	x1 message tz 0 foo
	x1 message tl 0 foo
	x1 message te 0 foo
	x1 message tf 0 foo
	x1 message td 0 foo
	x1 message ts 0 foo
	x1 message tz 50 foo
	x1 message tz 1000 foo
	x0 info tz

	c setgeometry
	x0 create t0 --table "0 2048 zero"
	x0 setgeometry t0 16 4 32 0
	x0 info t0
	x1 setgeometry t0 16 4
	x1 setgeometry t0 a b c d
	x0 info t0

	c remove-open
	x0 create t0 --table "0 2048 zero"
	hold t0
	x0 info t0
	x1 remove t0
	x0 info t0
	x0 info -c t0
	release
	x0 remove t0
	x ls
	c remove-deferred
	x0 create t0 --table "0 2048 zero"
	hold t0
	x0 remove --deferred t0
	x0 info t0
	x0 info -c t0
	x0 ls
	x1 create t0 --table "0 100 zero"
	release
	wait_gone t0
	x1 info t0
	x ls
	c remove-deferred-cancel
	x0 create t0 --table "0 2048 zero"
	hold t0
	x0 remove --deferred t0
	x0 info t0
	x0 message t0 0 @cancel_deferred_remove
	x0 info t0
	release
	x0 info t0
	c remove-force-open
	x0 create t0 --table "0 2048 linear $A 0"
	hold t0
	x1 remove --force t0
	x0 info t0
	x0 table t0
	release
	x remove t0
	x ls
	c remove-all
	x0 create t0 --table "0 100 zero"
	x0 create t1 --table "0 100 linear /dev/mapper/t0 0"
	x0 deps t1
	x0 ls --tree
	x0 remove_all
	x ls

	exec 3<&- 4<&-
	"$_dm_tool" remove_all --force >/dev/null 2>&1 || true
	_dm_kmark "end"
	sleep 0.2 # let cat catch up with the kernel log
	printf '%s\n' "${_dm_expect_failures[@]}" | grep . >"$_dm_out/expect-failures.txt" || true
	perl "$DM_CASES_LIB/dm-assemble" "$_dm_out" "$DM_WORK/kmsg.log" "$DM_A" "$DM_A_NUM" "$DM_B" "$DM_B_NUM"
}
