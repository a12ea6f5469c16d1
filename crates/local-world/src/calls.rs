//! The world's record of the calls it served (`api-calls.log`: one line
//! `SERVICE ACTION APP OUTCOME` per call, written by `moto_launch.py`) and
//! of the faults that struck (`failed.log`, `tag-lag.log`).

use std::collections::BTreeMap;

use crate::World;

impl World {
    /// The EC2 (and STS) calls a tool made so far, by action: counted by
    /// the emulator from the `app/NAME` part of the caller's User-Agent
    /// (ami-publisher sends `app/ami-publisher`).
    pub fn api_calls(&self, app: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let log = std::fs::read_to_string(self.dir.path().join("api-calls.log")).unwrap_or_default();
        for line in log.lines() {
            let mut f = line.split(' ');
            if let (Some(_service), Some(action), Some(who)) = (f.next(), f.next(), f.next())
                && who == app
            {
                *out.entry(action.to_owned()).or_default() += 1;
            }
        }
        out
    }

    /// The calls of a tool that the world answered with `outcome`, by
    /// action: "ok", or the fault that answered instead of EC2 ("bucket":
    /// the action's request token bucket was empty; "throttle", "error",
    /// "lag": NotFound for a resource too new; "lost": the answer of a
    /// mutating call was lost; "hang": the answer never came), or, for an
    /// error EC2 itself gives (a state refusal, a limit), its code, like
    /// "SnapshotCreationPerVolumeRateExceeded". See `moto_launch.py`.
    pub fn api_outcomes(&self, app: &str, outcome: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let log = std::fs::read_to_string(self.dir.path().join("api-calls.log")).unwrap_or_default();
        for line in log.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if let [_service, action, who, said, ..] = f[..]
                && who == app
                && said == outcome
            {
                *out.entry(action.to_owned()).or_default() += 1;
            }
        }
        out
    }

    /// How many snapshots and AMIs the `fail` fault made fail, if any.
    pub fn failed(&self) -> Option<usize> {
        let log = std::fs::read_to_string(self.dir.path().join("failed.log")).ok()?;
        Some(log.lines().count()).filter(|n| *n > 0)
    }

    /// How many tag changes the `lag` fault had seen late, if any.
    pub fn tags_seen_late(&self) -> Option<usize> {
        let log = std::fs::read_to_string(self.dir.path().join("tag-lag.log")).ok()?;
        Some(log.lines().count()).filter(|n| *n > 0)
    }

    /// How many calls each fault answered, of every tool: "throttle 12,
    /// lost 3" (for a run's log, so that a replay can be told what to
    /// expect).
    pub fn struck(&self) -> String {
        const FAULTS: [&str; 7] = ["bucket", "throttle", "error", "lag", "lost", "hang", "capacity"];
        let log = std::fs::read_to_string(self.dir.path().join("api-calls.log")).unwrap_or_default();
        let counts: Vec<String> = FAULTS
            .iter()
            .map(|f| (f, log.lines().filter(|l| l.split(' ').nth(3) == Some(*f)).count()))
            .filter(|(_, n)| *n > 0)
            .map(|(f, n)| format!("{f} {n}"))
            .chain(self.failed().into_iter().map(|n| format!("fail {n}")))
            .chain(self.tags_seen_late().into_iter().map(|n| format!("tag changes seen late {n}")))
            .collect();
        if counts.is_empty() { "none".to_owned() } else { counts.join(", ") }
    }
}
