#!/bin/bash
# Captures dmsetup's output on the kernel's device-mapper for every case of lib/dm-cases.sh.
# vm-timeout: 900
# Output: $VM_OUT/dmsetup-oracle/{raw,norm,kmsg}/CASE.txt (tests/vm/run
# --update-oracle copies it to tests/vm/oracle/$VM_KERNEL/).  Fails when a
# command's exit code is not the one the case list expects; a difference from
# the committed oracle is reported, not failed (it means: update the oracle).
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib/dm-cases.sh
. "$USERDM_REPO/tests/vm/lib/dm-cases.sh"

command -v dmsetup >/dev/null || {
	echo "dmsetup not installed on the host (apt-get install dmsetup)"
	exit 77
}
out=$VM_OUT/dmsetup-oracle
trap dm_cases_cleanup EXIT
dm_cases_prepare
dm_cases_run dmsetup "$out"
{
	echo "kernel: $(uname -r)"
	dmsetup version
	echo "dmsetup: $(dpkg-query -W -f='${Version}' dmsetup 2>/dev/null || echo unknown)"
} | sed '/^Library version:/d' >"$out/env.txt"
ncases=$(find "$out/raw" -name '*.txt' | wc -l)
echo "captured $ncases cases in $out"

committed=$USERDM_REPO/tests/vm/oracle/$VM_KERNEL/norm
if [[ -d $committed ]]; then
	if diff -ru "$committed" "$out/norm" >"$out/diff-vs-committed.txt"; then
		echo "same as the committed oracle tests/vm/oracle/$VM_KERNEL"
	else
		echo "NOTE: differs from the committed oracle tests/vm/oracle/$VM_KERNEL" \
			"(update with: tests/vm/run --kernel $VM_KERNEL --update-oracle dmsetup-oracle):"
		head -n 60 "$out/diff-vs-committed.txt"
	fi
else
	echo "NOTE: no committed oracle for $VM_KERNEL yet (tests/vm/run --kernel $VM_KERNEL --update-oracle dmsetup-oracle)"
fi

if [[ -s $out/expect-failures.txt ]]; then
	echo "FAIL: commands whose exit code was not the expected one:"
	cat "$out/expect-failures.txt"
	exit 1
fi
