# tests/e2e/summary.awk: the final line of an end-to-end run, from the output of tests/e2e/loop.sh
# over every test host boot: `awk -v want=BINARIES -f summary.awk OUTPUT`. It prints
#
#   e2e total: N passed, M failed, R retried (passed on retry: NAME, ...), I ignored (B of W test binaries reported)
#
# N and M count each test once: a test that failed and passed its retry is passed (libtest's own
# "test result:" line counted it as failed). R counts every retry, whatever its outcome.

/^test result: / {
    for (i = 1; i < NF; i++) {
        n = $i + 0
        if ($(i + 1) ~ /^passed/) passed += n
        if ($(i + 1) ~ /^failed/) failed += n
        if ($(i + 1) ~ /^ignored/) ignored += n
    }
    results++
}
/^e2e: RETRYING / { retried++ }
/^e2e retry: .* passed on its second run$/ {
    again++
    names = names (names == "" ? "" : ", ") $3
}
# A binary cut short by a test host failure has no "test result:" line: its passes count here.
/^     Running / { cut += oks; oks = 0 }
/^test [^ ]+ \.\.\. ok$/ { oks++ }
/^test result: / { oks = 0 }
/^e2e: THE TEST HOST FAILED/ { cut += oks; oks = 0 }
END {
    failed -= again
    if (failed < 0) failed = 0
    printf "\ne2e total: %d passed, %d failed, %d retried (passed on retry: %s), %d ignored (%d of %d test binaries reported)\n",
        passed + again + cut, failed, retried, (names == "" ? "none" : names), ignored, results, want
}
