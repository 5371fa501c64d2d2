#!/usr/bin/env bash
# End to end: `user` rows served by the example daemons (C, Rust memory, Rust async, Rust file),
# exported over NBD by a real userdm, checked with nbdcopy round trips and fio verify=crc32c;
# then kill -9 of the daemon in the middle of fio, a new daemon, and fio must finish with its
# verification passing and no IO error.
#
#   tests/dmuser/e2e.sh USERDM_BINARY [EXAMPLES_DIR]
#
# EXAMPLES_DIR holds the built Rust examples (mem_daemon, async_daemon, file_daemon); default
# target/release/examples, built here if missing. Needs cc, nbdcopy (libnbd-bin) and fio with
# its nbd engine. Prints 'N passed, M failed' last; exits non-zero on any failure.
set -uo pipefail

userdm=${1:?usage: tests/dmuser/e2e.sh USERDM_BINARY [EXAMPLES_DIR]}
root=$(cd "$(dirname "$0")/../.." && pwd)
examples=${2:-$root/target/release/examples}
userdm=$(realpath "$userdm")

for tool in cc nbdcopy fio cmp; do
    command -v "$tool" >/dev/null || { echo "e2e: $tool is needed" >&2; exit 2; }
done
if [ ! -x "$examples/mem_daemon" ]; then
    (cd "$root" && cargo build --release -p userdm-dmuser-daemon --examples) || exit 2
fi

work=$(mktemp -d /tmp/dmuser-e2e.XXXXXX)
export USERDM_DMUSER_DIR=$work/ctl
cc -std=c11 -O2 -pthread -o "$work/c_daemon" "$root/crates/userdm-dmuser-daemon/examples/c/mem_daemon.c" || exit 2

size_mib=64
sectors=$((size_mib * 2048))
passed=0
failed=0
daemon_pid=
devices=()

cleanup() {
    [ -n "$daemon_pid" ] && kill -9 "$daemon_pid" 2>/dev/null
    for d in "${devices[@]}"; do "$userdm" remove "$d" >/dev/null 2>&1; done
    rm -rf "$work"
}
trap cleanup EXIT

ok() { echo "ok   $1"; passed=$((passed + 1)); }
bad() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }

uri() { echo "nbd+unix:///$1?socket=$work/$1.sock"; }

create() { # NAME [OPTIONS...]
    local name=$1; shift
    "$userdm" create "$name" --table "0 $sectors user 0 $sectors $name $*" \
        --export "nbd:unix:$work/$name.sock" || return 1
    devices+=("$name")
    [ -S "$USERDM_DMUSER_DIR/$name" ] || { echo "no endpoint $USERDM_DMUSER_DIR/$name" >&2; return 1; }
}

remove() { # NAME
    "$userdm" remove "$1"
    local left=()
    for d in "${devices[@]}"; do [ "$d" != "$1" ] && left+=("$d"); done
    devices=("${left[@]}")
}

start_daemon() { # KIND NAME BACKING
    local ep=$USERDM_DMUSER_DIR/$2
    case $1 in
        c) "$work/c_daemon" "$ep" "$3" 4 & ;;
        rust-mem) "$examples/mem_daemon" "$ep" "$3" 4 & ;;
        rust-async) "$examples/async_daemon" "$ep" "$3" 4 & ;;
        rust-file) "$examples/file_daemon" "$ep" "$3" 4 & ;;
    esac
    daemon_pid=$!
}

fio_verify() { # NAME [EXTRA FIO ARGS...]
    local name=$1; shift
    fio --name=verify --ioengine=nbd --uri="$(uri "$name")" --rw=randwrite --bs=4k \
        --iodepth=16 --size=${size_mib}M --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --output="$work/fio-$name.log" "$@"
}

round_trips() { # KIND BACKING
    local kind=$1 name="dmu-$1"
    create "$name" || { bad "$kind: create"; return; }
    start_daemon "$kind" "$name" "$2"
    head -c $((size_mib << 20)) /dev/urandom >"$work/in"
    if nbdcopy "$work/in" "$(uri "$name")" && nbdcopy "$(uri "$name")" "$work/out" &&
        cmp -s "$work/in" "$work/out"; then
        ok "$kind: nbdcopy round trip"
    else
        bad "$kind: nbdcopy round trip"
    fi
    if fio_verify "$name"; then
        ok "$kind: fio verify=crc32c"
    else
        bad "$kind: fio verify=crc32c" "$(tail -5 "$work/fio-$name.log")"
    fi
    remove "$name" || bad "$kind: remove"
    if wait "$daemon_pid"; then ok "$kind: daemon exits cleanly on removal"; else bad "$kind: daemon exit"; fi
    daemon_pid=
}

kill_and_restart() { # KIND
    local kind=$1 name="dmu-kill-$1"
    truncate -s ${size_mib}M "$work/$name.img"
    create "$name" || { bad "$kind kill: create"; return; }
    start_daemon "$kind" "$name" "$work/$name.img"
    fio_verify "$name" --time_based=0 &
    local fio_pid=$!
    sleep 1
    kill -9 "$daemon_pid"
    wait "$daemon_pid" 2>/dev/null
    sleep 0.5
    start_daemon "$kind" "$name" "$work/$name.img"
    if wait "$fio_pid" && grep -q "err= 0" "$work/fio-$name.log"; then
        ok "$kind: kill -9 during fio, new daemon, verify passes"
    else
        bad "$kind: kill -9 during fio" "$(tail -5 "$work/fio-$name.log")"
    fi
    remove "$name"
    wait "$daemon_pid" 2>/dev/null
    daemon_pid=
}

round_trips c $((size_mib << 20))
round_trips rust-mem $((size_mib << 20))
round_trips rust-async $((size_mib << 20))
truncate -s ${size_mib}M "$work/file.img"
round_trips rust-file "$work/file.img"
kill_and_restart c
kill_and_restart rust-file

echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
