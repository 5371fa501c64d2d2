#!/bin/bash
# Runs the lib/dm-cases.sh cases with the userdm CLI and compares them with dmsetup's, same boot.
# vm-timeout: 1800
# Both sides are normalized (device numbers, library version) before the
# comparison; each mismatching case is shown as a unified diff (dmsetup's
# output is the "-" side).  Skipped (exit 77) while there is no userdm binary.
set -euo pipefail
# shellcheck source=SCRIPTDIR/../lib/dm-cases.sh
. "$USERDM_REPO/tests/vm/lib/dm-cases.sh"

if [[ -z ${USERDM_BIN:-} || ! -x ${USERDM_BIN:-} ]]; then
	echo "skipped: no userdm binary (build it with cargo build --release -p userdm, or set USERDM_BIN)"
	exit 77
fi
command -v dmsetup >/dev/null || {
	echo "skipped: dmsetup not installed on the host (apt-get install dmsetup)"
	exit 77
}
out=$VM_OUT/userdm-conformance
trap dm_cases_cleanup EXIT
dm_cases_prepare
echo "== oracle: dmsetup on the kernel's device-mapper"
dm_cases_run dmsetup "$out/dmsetup" >/dev/null
echo "== userdm: $USERDM_BIN"
# Without a kernel device per userdm device: `create` over ublk prints the /dev/ublkbN path,
# which dmsetup's create does not, and a ublk device per case costs time under TCG. The cases
# that need a kernel node stay "not compared" below; cli-ublk tests the CLI over ublk.
USERDM_UBLK_CONTROL=/nonexistent/ublk-control DM_CASES_CMD_TIMEOUT=60 \
	dm_cases_run "$USERDM_BIN" "$out/userdm" >/dev/null

# What is compared: stdout byte for byte, success or failure, and that a failure says why on
# stderr (lib/conformance-view explains the rules). Cases that open /dev/mapper/NAME need a
# kernel block device for each userdm device, which only the ublk export makes; they are
# reported, not compared (see above).
needs_block_device=" remove-open remove-deferred remove-deferred-cancel remove-force-open remove-all "
view=$USERDM_REPO/tests/vm/lib/conformance-view
pass=0 fail=0 skipped=0 failed=()
for f in "$out/dmsetup/norm/"*.txt; do
	name=$(basename "$f" .txt)
	if [[ $needs_block_device == *" $name "* ]]; then
		echo "not compared: $name (needs a kernel block device per userdm device)"
		skipped=$((skipped + 1))
		continue
	fi
	# Files, not <(...): the guest's /dev has no /dev/fd.
	"$view" "$f" >"$out/view-dmsetup.txt"
	"$view" "$out/userdm/norm/$name.txt" >"$out/view-userdm.txt"
	if diff -u --label "dmsetup/$name" --label "userdm/$name" "$out/view-dmsetup.txt" "$out/view-userdm.txt" >"$out/$name.diff"; then
		pass=$((pass + 1))
		rm -f "$out/$name.diff"
	else
		fail=$((fail + 1))
		failed+=("$name")
		cat "$out/$name.diff"
	fi
done
echo "conformance: $pass cases match, $fail differ${failed[*]:+: ${failed[*]}}, $skipped not compared"
[[ $fail -eq 0 ]]
