# tests/e2e/summary.awk: the final line of an end-to-end run, from the output of tests/e2e/loop.sh
# over every test host boot: `awk -v want=BINARIES -f summary.awk OUTPUT`. It prints
#
#   e2e total: N passed, M failed, R retried (passed on retry: NAME, ...), I ignored (B of W test binaries reported)
#
# N and M count each test once: a test that failed and passed its retry is passed (libtest's own
# "test result:" line counted it as failed). R counts every retry, whatever its outcome.
#
# Before it, when a test panicked: each panic (retried ones included, at most 20) with the first
# 4 non-empty lines of its message, each cut at 240 characters, so that the end of a long run's
# output says why it failed.

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
# The panics' digest: a panic's line, then its message's lines up to libtest's next section.
/^---- .* std(out|err) ----$/ || /^failures:$/ || /^test / { take = 0 }
take > 0 && $0 !~ /^thread '[^']*'( \([0-9]+\))? panicked at / && $0 != "" {
    digest[panics] = digest[panics] "\n      " substr($0, 1, 240)
    take--
}
/^thread '[^']*'( \([0-9]+\))? panicked at / {
    take = 0
    if (panics < 20) {
        panics++
        digest[panics] = "  " substr($0, 1, 240)
        take = 4
    }
}
END {
    if (panics > 0) {
        printf "\ne2e: what panicked (%d%s):\n", panics, (panics == 20 ? " shown, there may be more" : "")
        for (i = 1; i <= panics; i++) print digest[i]
    }
    failed -= again
    if (failed < 0) failed = 0
    printf "\ne2e total: %d passed, %d failed, %d retried (passed on retry: %s), %d ignored (%d of %d test binaries reported)\n",
        passed + again + cut, failed, retried, (names == "" ? "none" : names), ignored, results, want
}
