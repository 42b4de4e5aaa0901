//! A suite written as a table of named cases, run one after the other by one runner
//! (the hostile-client and hostile-device-VM suites). `VFU_HOSTILE_CASE=name` runs only
//! the case of that name.

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::time::Instant;

/// What [`run_cases`] runs: a case with a name unique in its table.
pub trait Case {
    /// The case's name.
    fn name(&self) -> &'static str;
}

/// Runs every case of `cases` (or only the one `VFU_HOSTILE_CASE` names) with `run`
/// in `env` (what the cases share, if anything), printing each one's name, time and
/// outcome; after a case fails, `after_failure` says whether to go on (it may clean up
/// for the next case). Panics, after the last case, with every failure of the `suite`;
/// also when the table has fewer than `at_least` cases or two of the same name, or no
/// case has the name asked for.
pub fn run_cases<C: Case, E>(
    suite: &str,
    cases: &[C],
    at_least: usize,
    env: &mut E,
    mut run: impl FnMut(&mut E, &C) -> Result<(), String>,
    mut after_failure: impl FnMut(&mut E) -> ControlFlow<()>,
) {
    let only = std::env::var("VFU_HOSTILE_CASE").ok();
    let names: HashSet<_> = cases.iter().map(Case::name).collect();
    assert_eq!(names.len(), cases.len(), "case names are unique");
    assert!(cases.len() >= at_least, "at least {at_least} cases");
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in cases
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| o == c.name()))
    {
        let t = Instant::now();
        let result = run(env, case);
        eprintln!(
            "{:<48} {:>7.2}s {}",
            case.name(),
            t.elapsed().as_secs_f64(),
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        ran += 1;
        if let Err(e) = result {
            failures.push(format!("{}: {e}", case.name()));
            if after_failure(env).is_break() {
                break;
            }
        }
    }
    assert!(ran > 0, "no case named {only:?}");
    assert!(
        failures.is_empty(),
        "{} of {ran} {suite} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
