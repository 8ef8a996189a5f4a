//! Health checks (`streetflow doctor`): each stage checks what it owns and says in plain
//! words what is wrong; the command prints them together.

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// As it should be.
    Ok,
    /// Works, but needs attention.
    Warn,
    /// Does not work: the pipeline cannot run (or would lose data) until fixed.
    Fail,
}

impl Status {
    /// How it is printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warning",
            Status::Fail => "PROBLEM",
        }
    }
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked (`brokers`, `table pos_events`, …).
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was seen, and what to do when it is not ok.
    pub detail: String,
}

/// Checks in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checks(pub Vec<Check>);

impl Checks {
    /// Adds a check's outcome.
    pub fn add(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.0.push(Check {
            name: name.into(),
            status,
            detail: detail.into(),
        });
    }

    /// How many failed.
    pub fn problems(&self) -> usize {
        self.0.iter().filter(|c| c.status == Status::Fail).count()
    }
}
