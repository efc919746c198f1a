#!/bin/sh
# tests/e2e/loop.sh [ARGS...] -- BIN...: the loop tests/e2e/run runs inside the test host. Each
# test binary runs with --test-threads=1 and ARGS (words: a test name filter, --skip NAME, ...)
# and its output (stdout and stderr) is printed; the loop goes on after a failure and exits with
# the number of failed binaries.
#
# A failed test is run once more, alone (--exact), only when ITS OWN output carries a
# nested-virtualization signature: a line matching one of the extended regular expressions in
# tests/e2e/nested-virt-signatures (the test host's nested SVM crashed or stalled the guest
# before its agent answered; tests/testhost/README.md, "Known flakiness"). Its own output: the
# lines printed while it ran (with --test-threads=1, from its "test NAME ... " line to the next
# test's) and its captured output (libtest's "---- NAME stdout ----" section). Every retry is
# said with the signature and the line that matched; the binary passes when each failed test
# passed its retry. A failure without a signature is final ("not retried: no
# nested-virtualization signature in its output"): a leak, a wrong output or a wrong status is
# never run again.
#
# Lines the runner reads (keep them): "e2e: finished BIN" after each binary (what a resumed run
# skips), "error: BIN failed (exit status N)" for a failed binary, "e2e: RETRYING NAME ..." for
# each retry and "e2e retry: NAME passed on its second run" (tests/e2e/summary.awk counts them).
#
# Environment: HUSK_E2E_RETRY=0 (no retries), HUSK_E2E_SIGNATURES (another signature file; the
# self-test's). POSIX sh: it runs under the test host's /bin/sh. Tested by tests/e2e/loop-selftest.
set -u

here=$(cd "$(dirname "$0")" && pwd)
signatures=${HUSK_E2E_SIGNATURES:-$here/nested-virt-signatures}

extra=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    extra="$extra $1"
    shift
done
[ $# -gt 0 ] && shift

work=$(mktemp -d "${TMPDIR:-/tmp}/husk-e2e-loop.XXXXXX") || {
    echo "error: cannot create a temporary directory for the test loop"
    exit 1
}
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The signatures without comments and blank lines (a blank pattern would match every line).
patterns=$work/patterns
if ! grep -v -e '^[[:space:]]*#' -e '^[[:space:]]*$' "$signatures" >"$patterns"; then
    echo "error: no nested-virtualization signatures in $signatures (missing or empty)"
    exit 1
fi

# The names of the failed tests: libtest's list after the last "failures:" line, just before
# its "test result:" line (robust to output written between "test NAME ... " and "FAILED").
failed_tests() {
    awk '
        /^failures:$/ { names = ""; listing = 1; next }
        listing && /^    [^ ]+$/ { names = names substr($0, 5) "\n"; next }
        listing { listing = 0 }
        /^test result: / { printf "%s", names; names = "" }
    ' "$1"
}

# What test NAME printed itself in the binary's output FILE: from its "test NAME ... " line to
# the next test's line, and its "---- NAME stdout ----" section.
own_output() {
    awk -v name="$1" '
        BEGIN { start = "test " name " ... "; section = "---- " name " stdout ----" }
        running && (/^test [^ ]+ \.\.\. / || /^failures:$/ || /^test result: /) { running = 0 }
        captured && (/^---- .* stdout ----$/ || /^failures:$/) { captured = 0 }
        index($0, start) == 1 { running = 1 }
        $0 == section { captured = 1 }
        running || captured { print }
    ' "$2"
}

# The first signature FILE matches and the line it matched (two lines); status 1 when none does.
signature() {
    while IFS= read -r pattern; do
        if line=$(LC_ALL=C grep -a -m 1 -E -e "$pattern" "$1"); then
            printf '%s\n%s\n' "$pattern" "$line"
            return 0
        fi
    done <"$patterns"
    return 1
}

failed=0
out=$work/binary.out
status=$work/binary.status
for bin in "$@"; do
    printf '     Running %s\n' "$bin"
    # shellcheck disable=SC2086 # ARGS are words
    { "$bin" --test-threads=1 $extra 2>&1; echo $? >"$status"; } | tee "$out"
    rc=$(cat "$status")
    if [ "$rc" -eq 0 ]; then
        echo "e2e: finished $bin"
        continue
    fi
    names=$(failed_tests "$out")
    if [ -z "$names" ]; then
        echo "e2e: $bin failed (exit status $rc) without naming a failed test: not retried"
        echo "error: $bin failed (exit status $rc)"
        failed=$((failed + 1))
        echo "e2e: finished $bin"
        continue
    fi
    final=0
    for name in $names; do
        if [ "${HUSK_E2E_RETRY:-1}" = 0 ]; then
            echo "e2e: $name failed; not retried: HUSK_E2E_RETRY=0"
            final=$((final + 1))
            continue
        fi
        own_output "$name" "$out" >"$work/own"
        if ! signature "$work/own" >"$work/match"; then
            echo "e2e: $name failed; not retried: no nested-virtualization signature in its output"
            final=$((final + 1))
            continue
        fi
        echo "e2e: RETRYING $name once, alone: its output carries a nested-virtualization signature"
        printf 'e2e:     signature: %s\n' "$(sed -n 1p "$work/match")"
        printf 'e2e:     matched:   %.500s\n' "$(sed -n 2p "$work/match")"
        { "$bin" --test-threads=1 --exact "$name" 2>&1; echo $? >"$status"; } | sed "s/^/    [retry] /"
        if [ "$(cat "$status")" -eq 0 ]; then
            echo "e2e retry: $name passed on its second run"
        else
            echo "e2e retry: $name failed again"
            final=$((final + 1))
        fi
    done
    if [ "$final" -ne 0 ]; then
        echo "error: $bin failed (exit status $rc)"
        failed=$((failed + 1))
    fi
    echo "e2e: finished $bin"
done
exit "$failed"
