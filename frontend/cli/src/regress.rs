//! The benchmark's regression check: `cio bench --record-baseline FILE`
//! runs the bench several times and keeps, row by row, the ratios it saw
//! (median, best, worst: the run-to-run noise of this machine) and the
//! limit beyond which a later run counts as a regression; `cio bench
//! --check FILE` runs it once more and fails if a ratio went past its
//! limit. Ratios, not absolute numbers: cio and its baseline are measured
//! in the same run, so a slower machine moves both.

use serde::{Deserialize, Serialize};

use crate::bench::{Options, Report, Row, Transport};

/// The file format.
const FORMAT: u32 = 1;

/// How much worse than the worst recorded run a ratio may get before the
/// check fails: the noise seen while recording, and as much again.
pub const MARGIN: f64 = 1.5;

/// A recorded baseline.
#[derive(Debug, Serialize, Deserialize)]
pub struct Baseline {
    cio_bench_baseline: u32,
    /// How many runs it was made from.
    pub runs: usize,
    /// The cores of the machine it was recorded on (rows pinned to two
    /// cores exist only with two).
    pub cores: usize,
    /// The check fails when a ratio is worse than the worst run by more
    /// than this factor.
    pub margin: f64,
    /// One entry per row measured in every run.
    pub rows: Vec<Recorded>,
    /// Rows measured but not checked, and why.
    pub unchecked: Vec<String>,
}

/// One row's recorded ratios.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    /// P1, P2, …
    pub id: String,
    /// The transport it was measured on.
    pub transport: Transport,
    /// What was measured (without the run's own figures).
    pub what: String,
    /// Whether a higher ratio is better (throughput) or a lower one
    /// (latency, cost).
    pub higher_is_better: bool,
    /// The median of the recorded ratios.
    pub median: f64,
    /// The best and the worst of them.
    pub best: f64,
    /// The worst.
    pub worst: f64,
    /// Run-to-run noise: (worst − best) / median.
    pub noise: f64,
    /// A ratio past this fails the check.
    pub limit: f64,
}

/// What a row is called across runs: a P3 row's text carries the device
/// time of its own run ("(-30us device)"), which is not part of its name.
fn name(r: &Row) -> String {
    match r.what.find(" (-") {
        Some(at) => r.what[..at].to_owned(),
        None => r.what.clone(),
    }
}

fn key(r: &Row) -> (String, Transport, String) {
    (r.id.to_owned(), r.transport, name(r))
}

/// Lower is better for times (and the costs measured in them), higher for
/// throughputs and rates.
fn higher_is_better(r: &Row) -> bool {
    r.unit != "us"
}

impl Baseline {
    /// The baseline of `runs` (rows missing from any run are left out).
    pub fn record(runs: &[Report]) -> Result<Baseline, String> {
        let first = runs.first().ok_or("no runs to record")?;
        if runs.iter().any(|r| r.quick) {
            return Err("a baseline is made of full runs, not --quick ones".into());
        }
        let mut rows = Vec::new();
        let mut unchecked = Vec::new();
        for row in &first.rows {
            let k = key(row);
            if row.placement_bound {
                unchecked.push(format!(
                    "{} {} {}: depends on where the scheduler puts its two ends' threads (README, \"Where threads run\")",
                    k.0, k.1, k.2
                ));
                continue;
            }
            if row.target == "(info)" {
                unchecked.push(format!(
                    "{} {} {}: informational (no target), and too noisy here for a limit that would still catch anything",
                    k.0, k.1, k.2
                ));
                continue;
            }
            let mut ratios: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.rows.iter().find(|x| key(x) == k).map(|x| x.ratio))
                .filter(|x| x.is_finite())
                .collect();
            if ratios.len() != runs.len() {
                continue;
            }
            ratios.sort_by(f64::total_cmp);
            let higher = higher_is_better(row);
            let (low, high) = (ratios[0], ratios[ratios.len() - 1]);
            let median = ratios[ratios.len() / 2];
            let (best, worst) = if higher { (high, low) } else { (low, high) };
            rows.push(Recorded {
                id: k.0,
                transport: k.1,
                what: k.2,
                higher_is_better: higher,
                median,
                best,
                worst,
                noise: if median > 0.0 {
                    (high - low) / median
                } else {
                    0.0
                },
                limit: if higher {
                    worst / MARGIN
                } else {
                    worst * MARGIN
                },
            });
        }
        Ok(Baseline {
            cio_bench_baseline: FORMAT,
            runs: runs.len(),
            cores: first.cores,
            margin: MARGIN,
            rows,
            unchecked,
        })
    }

    /// Reads a baseline written by [`to_text`](Self::to_text).
    pub fn from_text(text: &str) -> Result<Baseline, String> {
        let b: Baseline = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if b.cio_bench_baseline != FORMAT {
            return Err(format!(
                "baseline format {} (this cio reads {FORMAT})",
                b.cio_bench_baseline
            ));
        }
        Ok(b)
    }

    /// The baseline as text (JSON).
    pub fn to_text(&self) -> String {
        serde_json::to_string_pretty(self).expect("a baseline serialises") + "\n"
    }

    /// What a check measures: the measurements and transports of the
    /// recorded rows `which` picks (by index), full runs.
    pub fn options(
        &self,
        which: impl Fn(usize) -> bool,
        rdma_addr: Option<std::net::IpAddr>,
    ) -> Options {
        let mut o = Options {
            quick: false,
            transports: Vec::new(),
            only: Vec::new(),
            rdma_addr,
        };
        for (_, r) in self.rows.iter().enumerate().filter(|(i, _)| which(*i)) {
            if !o.transports.contains(&r.transport) {
                o.transports.push(r.transport);
            }
            if !o.only.contains(&r.id) {
                o.only.push(r.id.clone());
            }
        }
        o
    }

    /// Compares a run with the baseline: one verdict per recorded row, in
    /// the baseline's order. A recorded row the run did not measure counts
    /// as regressed (renamed or dropped: record again).
    pub fn check(&self, run: &Report) -> Result<Vec<Verdict>, String> {
        if run.quick {
            return Err("a --quick run cannot be checked against a baseline".into());
        }
        if run.cores != self.cores {
            return Err(format!(
                "the baseline was recorded on {} cores and this machine has {}: record one here (cio bench --record-baseline)",
                self.cores, run.cores
            ));
        }
        Ok(self
            .rows
            .iter()
            .map(|b| {
                let found = run.rows.iter().find(|r| {
                    let (id, t, w) = key(r);
                    id == b.id && t == b.transport && w == b.what
                });
                let Some(r) = found else {
                    return Verdict {
                        ratio: None,
                        regressed: true,
                    };
                };
                let worse = if b.higher_is_better {
                    r.ratio < b.limit
                } else {
                    r.ratio > b.limit
                };
                Verdict {
                    ratio: Some(r.ratio),
                    regressed: worse || !r.ratio.is_finite(),
                }
            })
            .collect())
    }

    /// A line for recorded row `i` and its verdict.
    pub fn line(&self, i: usize, v: &Verdict) -> String {
        let b = &self.rows[i];
        let ratio = match v.ratio {
            Some(r) => format!("{r:8.2}"),
            None => "    none".into(),
        };
        format!(
            "{:3} {:5} {:48} {ratio} (recorded {:.2}, {:.2}..{:.2}; limit {} {:.2}) {}",
            b.id,
            b.transport.to_string(),
            b.what,
            b.median,
            b.best,
            b.worst,
            if b.higher_is_better { ">=" } else { "<=" },
            b.limit,
            match (v.ratio, v.regressed) {
                (None, _) => "NOT MEASURED (record the baseline again if it was renamed)",
                (Some(_), true) => "REGRESSED",
                (Some(_), false) => "ok",
            }
        )
    }
}

/// One recorded row checked against a run.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    /// The run's ratio, if it measured the row.
    pub ratio: Option<f64>,
    /// Past its limit (or not measured).
    pub regressed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Stat;

    fn row(id: &'static str, what: &str, unit: &'static str, ratio: f64) -> Row {
        let s = Stat {
            median: 1.0,
            p99: 1.0,
            samples: 1,
        };
        Row {
            id,
            what: what.into(),
            transport: Transport::Tcp,
            unit,
            cio: s,
            raw: s,
            ratio_is: "cio/raw",
            ratio,
            target: String::new(),
            met: true,
            placement_bound: false,
        }
    }

    fn run(p1: f64, p3: f64, device_us: u32) -> Report {
        Report {
            cores: 2,
            quick: false,
            rows: vec![
                row("P1", "BAR read 4 B round trip", "us", p1),
                row(
                    "P3",
                    &format!("DMA sync dev->target, 1 MiB (-{device_us}us device)"),
                    "MiB/s",
                    p3,
                ),
                Row {
                    target: "(info)".into(),
                    ..row("P3", "DMA sync dev->target, 4 KiB", "MiB/s", 0.1)
                },
                row("P1", "BAR read, left to the scheduler", "us", 4.0).placement_bound(true),
            ],
        }
    }

    #[test]
    fn noise_and_limits_follow_the_direction_of_each_row() {
        let b =
            Baseline::record(&[run(1.2, 0.6, 30), run(1.4, 0.5, 31), run(1.3, 0.7, 29)]).unwrap();
        assert_eq!(b.rows.len(), 2, "the P3 row is one row across runs");
        assert_eq!(b.unchecked.len(), 2, "{:?}", b.unchecked);
        let p1 = &b.rows[0];
        assert!(!p1.higher_is_better);
        assert_eq!((p1.median, p1.best, p1.worst), (1.3, 1.2, 1.4));
        assert!((p1.limit - 1.4 * MARGIN).abs() < 1e-9);
        assert!((p1.noise - 0.2 / 1.3).abs() < 1e-9);
        let p3 = &b.rows[1];
        assert!(p3.higher_is_better);
        assert_eq!((p3.best, p3.worst), (0.7, 0.5));
        assert!((p3.limit - 0.5 / MARGIN).abs() < 1e-9);
        // Round trip through the file.
        let b = Baseline::from_text(&b.to_text()).unwrap();

        let regressed =
            |r: &Report| -> Vec<bool> { b.check(r).unwrap().iter().map(|v| v.regressed).collect() };
        // Within the noise (and the margin): passes, whichever device time.
        assert_eq!(regressed(&run(1.9, 0.4, 12)), [false, false]);
        // P1 twice as slow as its worst recorded run: fails, and says so.
        let v = b.check(&run(2.9, 0.6, 30)).unwrap();
        assert!(v[0].regressed && !v[1].regressed);
        assert!(
            b.line(0, &v[0]).ends_with("REGRESSED"),
            "{}",
            b.line(0, &v[0])
        );
        // P3 at a fraction of its worst: fails.
        assert_eq!(regressed(&run(1.3, 0.2, 30)), [false, true]);
        // A row that is gone fails; a quick run is refused.
        let mut gone = run(1.3, 0.6, 30);
        gone.rows.remove(1);
        let v = b.check(&gone).unwrap();
        assert!(v[1].regressed && v[1].ratio.is_none());
        assert!(b.line(1, &v[1]).contains("NOT MEASURED"));
        let mut quick = run(1.3, 0.6, 30);
        quick.quick = true;
        assert!(b.check(&quick).is_err());
        let mut other = run(1.3, 0.6, 30);
        other.cores = 4;
        assert!(b.check(&other).unwrap_err().contains("4"));
        let o = b.options(|_| true, None);
        assert_eq!(o.transports, [Transport::Tcp]);
        assert_eq!(o.only, ["P1", "P3"]);
        assert!(!o.quick);
        assert_eq!(b.options(|i| i == 1, None).only, ["P3"]);
        assert!(Baseline::record(&[quick]).is_err());
    }
}
