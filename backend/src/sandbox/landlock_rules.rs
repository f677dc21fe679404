//! Landlock, for when a mount namespace is refused (an unprivileged daemon on a host
//! without user namespaces): the same paths stay reachable, with the same access, and
//! nothing else of the filesystem. It binds the calling thread and the threads it starts.

use landlock::{Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI};

use super::{Access as PathAccess, Reachable, Result};

/// The newest ABI whose file-system rights are asked for; older kernels enforce what they
/// know (best effort), and the status says so.
const ABI_ASKED: ABI = ABI::V5;

/// Restricts the filesystem to `paths`. Returns how much of it the kernel enforces.
pub fn restrict(paths: &[Reachable]) -> Result<RulesetStatus> {
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(ABI_ASKED))?.create()?;
    for r in paths {
        let mut access = match r.access {
            PathAccess::ReadOnly => AccessFs::from_read(ABI_ASKED),
            PathAccess::ReadWrite => AccessFs::from_all(ABI_ASKED),
        };
        if !r.path.is_dir() {
            access &= AccessFs::from_file(ABI_ASKED);
        }
        ruleset = ruleset.add_rule(PathBeneath::new(PathFd::new(&r.path)?, access))?;
    }
    Ok(ruleset.restrict_self()?.ruleset)
}
