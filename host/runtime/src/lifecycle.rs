//! Which operation is allowed in which container status (runtime-spec "Lifecycle" and
//! "Operations"), with runc's wording for refusals. The sandbox verbs check here first, under the
//! container's lock, with the status refreshed by `Record::current_state`.

use oci_spec::runtime::ContainerState;

use crate::id::ContainerId;

/// The state-changing operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `start`: run the user's process.
    Start,
    /// `kill`: send a signal.
    Kill,
    /// `delete` without `--force`.
    Delete,
    /// `delete --force`: kill first if needed.
    ForceDelete,
    /// `exec`: a new process in the container.
    Exec,
    /// `pause`.
    Pause,
    /// `resume`.
    Resume,
}

impl Operation {
    fn verb(self) -> &'static str {
        match self {
            Operation::Start => "start",
            Operation::Kill => "kill",
            Operation::Delete | Operation::ForceDelete => "delete",
            Operation::Exec => "exec into",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
        }
    }
}

/// An operation refused in the container's current status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {verb} container {id}: it is {status}{hint}")]
pub struct NotAllowed {
    pub id: ContainerId,
    pub verb: &'static str,
    pub status: ContainerState,
    pub hint: &'static str,
}

/// Checks that `operation` is allowed on container `id` in `status`.
///
/// Paused is not an OCI status (runc reports its own `paused`; the runtime-spec and its types
/// have none): a paused container is `running` in OCI terms, and `paused` says whether it is.
pub fn check(
    id: &ContainerId,
    status: ContainerState,
    paused: bool,
    operation: Operation,
) -> Result<(), NotAllowed> {
    use ContainerState::{Created, Creating, Running, Stopped};
    let hint = match (operation, status) {
        (Operation::Start, Created) => return Ok(()),
        (Operation::Start, Running | Stopped) => " (a container starts once)",
        (Operation::Kill, Created | Running) => return Ok(()),
        (Operation::Delete, Stopped) => return Ok(()),
        (Operation::Delete, Created | Running) => " (stop it first, or use --force)",
        (Operation::ForceDelete, Created | Running | Stopped) => return Ok(()),
        (Operation::Exec, Running) if !paused => return Ok(()),
        (Operation::Pause, Running) if !paused => return Ok(()),
        (Operation::Resume, Running) if paused => return Ok(()),
        (Operation::Exec | Operation::Pause, Running) => " and paused",
        (Operation::Resume, Running) => " and not paused",
        (_, Creating) => " (its creation has not finished)",
        _ => "",
    };
    Err(NotAllowed {
        id: id.clone(),
        verb: operation.verb(),
        status,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::ContainerState::{Created, Creating, Running, Stopped};
    use super::Operation::*;
    use super::*;

    fn allowed(status: ContainerState, paused: bool, op: Operation) -> bool {
        check(&ContainerId::new("c").unwrap(), status, paused, op).is_ok()
    }

    #[test]
    fn the_oci_lifecycle_table() {
        // (operation, creating, created, running, stopped)
        let table = [
            (Start, false, true, false, false),
            (Kill, false, true, true, false),
            (Delete, false, false, false, true),
            (ForceDelete, false, true, true, true),
            (Exec, false, false, true, false),
            (Pause, false, false, true, false),
            (Resume, false, false, false, false),
        ];
        for (op, creating, created, running, stopped) in table {
            assert_eq!(allowed(Creating, false, op), creating, "{op:?} creating");
            assert_eq!(allowed(Created, false, op), created, "{op:?} created");
            assert_eq!(allowed(Running, false, op), running, "{op:?} running");
            assert_eq!(allowed(Stopped, false, op), stopped, "{op:?} stopped");
        }
    }

    #[test]
    fn pausing_changes_what_a_running_container_allows() {
        assert!(allowed(Running, true, Resume));
        assert!(allowed(Running, true, Kill));
        assert!(allowed(Running, true, ForceDelete));
        assert!(!allowed(Running, true, Exec));
        assert!(!allowed(Running, true, Pause));
    }

    #[test]
    fn refusals_say_why() {
        let id = ContainerId::new("web").unwrap();
        assert_eq!(
            check(&id, Running, false, Delete).unwrap_err().to_string(),
            "cannot delete container web: it is running (stop it first, or use --force)"
        );
        assert_eq!(
            check(&id, Stopped, false, Start).unwrap_err().to_string(),
            "cannot start container web: it is stopped (a container starts once)"
        );
        assert_eq!(
            check(&id, Stopped, false, Kill).unwrap_err().to_string(),
            "cannot kill container web: it is stopped"
        );
    }
}
