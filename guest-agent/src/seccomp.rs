//! OCI `linux.seccomp` to BPF programs, with seccompiler (pure Rust; no libseccomp).
//!
//! seccompiler builds a filter with one match action and one mismatch action. An OCI profile has
//! a default action and per-rule actions, so it becomes several filters, all installed: one
//! "base" filter (listed syscalls → allow, others → the default action) and one filter per distinct
//! rule action (its syscalls → that action, others → allow). The kernel applies the most
//! restrictive result of all filters, which is exactly the OCI meaning.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::config::BpfInsn;
use crate::spec::{Seccomp, SeccompArg};

fn action(name: &str, errno_ret: Option<u32>) -> Result<SeccompAction, String> {
    Ok(match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno_ret.unwrap_or(libc::EPERM as u32)),
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno_ret.unwrap_or(libc::EPERM as u32)),
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_NOTIFY" => {
            return Err("SCMP_ACT_NOTIFY is not supported (no seccomp agent in the guest)".into())
        }
        other => return Err(format!("unknown action {other:?}")),
    })
}

fn condition(arg: &SeccompArg) -> Result<SeccompCondition, String> {
    let index = u8::try_from(arg.index)
        .ok()
        .filter(|i| *i < 6)
        .ok_or_else(|| format!("argument index {} out of range 0..6", arg.index))?;
    let (op, value) = match arg.op.as_str() {
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, arg.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, arg.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, arg.value),
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, arg.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, arg.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, arg.value),
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(arg.value), arg.value_two),
        other => return Err(format!("unknown operator {other:?}")),
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).map_err(|e| e.to_string())
}

/// Rules per syscall number: `None` means unconditional.
type RuleMap = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn add_rule(map: &mut RuleMap, nr: i64, rule: Option<SeccompRule>) {
    let entry = map.entry(nr).or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), rule) {
        (Some(rules), Some(r)) => rules.push(r),
        (_, None) => *entry = None,
        (None, Some(_)) => {}
    }
}

fn build(
    map: RuleMap,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let rules = map
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// Compiles a profile into the programs to install. Unknown syscall names are skipped with a
/// warning (as runc does: profiles list syscalls of every architecture).
pub fn compile(s: &Seccomp, _no_new_privileges: bool) -> Result<Vec<Vec<BpfInsn>>, String> {
    if s.listener_path.as_deref().is_some_and(|p| !p.is_empty()) {
        return Err("listenerPath is not supported (no seccomp agent in the guest)".into());
    }
    for f in &s.flags {
        if f != "SECCOMP_FILTER_FLAG_TSYNC" {
            return Err(format!("flag {f:?} is not supported"));
        }
    }
    for a in &s.architectures {
        if !matches!(
            a.as_str(),
            "SCMP_ARCH_X86_64" | "SCMP_ARCH_X86" | "SCMP_ARCH_X32" | "SCMP_ARCH_NATIVE"
        ) {
            return Err(format!("architecture {a:?} cannot run in an x86_64 guest"));
        }
    }
    let default = action(&s.default_action, s.default_errno_ret)?;
    let mut base: RuleMap = BTreeMap::new();
    let mut per_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    for (i, sc) in s.syscalls.iter().enumerate() {
        let act = action(&sc.action, sc.errno_ret).map_err(|e| format!("syscalls[{i}]: {e}"))?;
        let rule = if sc.args.is_empty() {
            None
        } else {
            let conds = sc
                .args
                .iter()
                .map(condition)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("syscalls[{i}]: {e}"))?;
            Some(SeccompRule::new(conds).map_err(|e| format!("syscalls[{i}]: {e}"))?)
        };
        for name in &sc.names {
            let Ok(nr) = syscalls::Sysno::from_str(name) else {
                tracing::warn!(syscall = %name, "seccomp: unknown syscall name on x86_64, rule skipped");
                continue;
            };
            let nr = i64::from(nr.id());
            if act == default {
                continue;
            }
            add_rule(&mut base, nr, rule.clone());
            if act != SeccompAction::Allow {
                let idx = match per_action.iter().position(|(a, _)| *a == act) {
                    Some(idx) => idx,
                    None => {
                        per_action.push((act.clone(), BTreeMap::new()));
                        per_action.len() - 1
                    }
                };
                if let Some((_, map)) = per_action.get_mut(idx) {
                    add_rule(map, nr, rule.clone());
                }
            }
        }
    }
    let mut programs = Vec::new();
    if default != SeccompAction::Allow {
        programs.push(build(base, default, SeccompAction::Allow)?);
    }
    for (act, map) in per_action {
        programs.push(build(map, SeccompAction::Allow, act)?);
    }
    Ok(programs
        .into_iter()
        .map(|p| {
            p.into_iter()
                .map(|i| BpfInsn {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn profile(v: serde_json::Value) -> Seccomp {
        serde_json::from_value(v).expect("profile parses")
    }

    #[test]
    fn deny_list_compiles_to_one_filter() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        }));
        assert_eq!(compile(&p, true).expect("compiles").len(), 1);
    }

    #[test]
    fn allow_list_with_args_compiles() {
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [
                {"names": ["read", "write", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
                {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        }));
        assert_eq!(compile(&p, true).expect("compiles").len(), 1);
    }

    #[test]
    fn refuses_notify_and_bad_args() {
        let p = profile(serde_json::json!({"defaultAction": "SCMP_ACT_NOTIFY"}));
        assert!(compile(&p, true).is_err());
        let p = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ERRNO",
                          "args": [{"index": 7, "value": 0, "op": "SCMP_CMP_EQ"}]}]
        }));
        assert!(compile(&p, true).is_err());
    }
}
