//! The bench's results: rows of rsvc, etcd and the floor, printed as one table or as JSON.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Which way is better for a row.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub(crate) enum Better {
    /// Throughput.
    Higher,
    /// Latency, gaps.
    Lower,
}

/// One measured quantity.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    /// What was measured.
    pub what: String,
    /// Its unit.
    pub unit: &'static str,
    /// rsvc's figure.
    pub rsvc: Option<f64>,
    /// etcd's figure.
    pub etcd: Option<f64>,
    /// The physical floor for it, where one applies.
    pub floor: Option<f64>,
    /// Which way is better.
    pub better: Better,
}

/// Latency percentiles of a histogram in microseconds, as milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Pcts {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Pcts {
    pub(crate) fn of(h: &Histogram<u64>) -> Pcts {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Pcts {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            max: h.max() as f64 / 1000.0,
        }
    }
}

/// The whole run.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    /// When and where.
    pub machine: String,
    /// The rows, in order.
    pub rows: Vec<Row>,
    /// Acknowledged writes found missing afterwards, per system (must be 0).
    pub lost_writes: Vec<(String, u64)>,
    /// Parts of the run that failed, and why.
    pub failures: Vec<String>,
}

impl Report {
    pub(crate) fn row(&mut self, what: impl Into<String>, unit: &'static str, better: Better) -> &mut Row {
        let what = what.into();
        if let Some(i) = self.rows.iter().position(|r| r.what == what) {
            return &mut self.rows[i];
        }
        self.rows.push(Row {
            what,
            unit,
            rsvc: None,
            etcd: None,
            floor: None,
            better,
        });
        self.rows.last_mut().expect("just pushed")
    }

    /// The table in Markdown.
    pub(crate) fn table(&self) -> String {
        let f = |v: Option<f64>| v.map_or("—".to_string(), fmt);
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "—".into(),
        };
        let mut s = String::from("| workload | unit | rsvc | etcd | rsvc/etcd | floor | rsvc/floor |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                r.what,
                r.unit,
                f(r.rsvc),
                f(r.etcd),
                ratio(r.rsvc, r.etcd),
                f(r.floor),
                ratio(r.rsvc, r.floor),
            ));
        }
        for (sys, n) in &self.lost_writes {
            s.push_str(&format!("\nacknowledged writes lost by {sys}: {n}"));
        }
        for f in &self.failures {
            s.push_str(&format!("\nFAILED: {f}"));
        }
        s
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
