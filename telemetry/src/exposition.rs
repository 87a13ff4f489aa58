//! A strict reader of the Prometheus text exposition format (version 0.0.4), used to
//! check what the scrape endpoint serves where `promtool check metrics` is not installed
//! (the tests run it too when it is).
//!
//! It parses every line and checks what promtool's parser and linter check for the
//! metric types Flotilla serves: names and label names are valid, label values are
//! properly escaped, values are numbers, every family has one `# TYPE` given before its
//! samples, a family's samples are contiguous, no series appears twice, counters end in
//! `_total`, and histograms have ascending cumulative `_bucket{le=…}` series ending in
//! `+Inf` that equals `_count`, plus a `_sum`.

use std::collections::{HashMap, HashSet};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Label pairs in the order written, values unescaped.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A metric family: its type and samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// What is wrong with an exposition, with the 1-based line number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ExpositionError {
    pub line: usize,
    pub what: String,
}

fn err<T>(line: usize, what: impl Into<String>) -> Result<T, ExpositionError> {
    Err(ExpositionError {
        line,
        what: what.into(),
    })
}

fn valid_name(s: &str, colons: bool) -> bool {
    let mut chars = s.chars();
    let first_ok = |c: char| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
    match chars.next() {
        Some(c) if first_ok(c) => chars.all(|c| first_ok(c) || c.is_ascii_digit()),
        _ => false,
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// Parses `name{a="x",b="y"} value [timestamp]`.
fn parse_sample(text: &str, line: usize) -> Result<Sample, ExpositionError> {
    let name_end = text.find(['{', ' ']).unwrap_or(text.len());
    let name = &text[..name_end];
    if !valid_name(name, true) {
        return err(line, format!("'{name}' is not a metric name"));
    }
    let mut rest = &text[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut s = after;
        loop {
            s = s.trim_start();
            if let Some(r) = s.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = s.find('=').ok_or_else(|| ExpositionError {
                line,
                what: "a label without '='".into(),
            })?;
            let label = s[..eq].trim();
            if !valid_name(label, false) || label.starts_with("__") {
                return err(line, format!("'{label}' is not a label name"));
            }
            s = s[eq + 1..].trim_start();
            let Some(body) = s.strip_prefix('"') else {
                return err(line, format!("label {label}: the value is not quoted"));
            };
            let mut value = String::new();
            let mut chars = body.char_indices();
            let end = loop {
                match chars.next() {
                    None => return err(line, format!("label {label}: unterminated value")),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        _ => return err(line, format!("label {label}: bad escape")),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.iter().any(|(l, _): &(String, String)| l == label) {
                return err(line, format!("label {label} given twice"));
            }
            labels.push((label.to_string(), value));
            s = &body[end + 1..];
            s = s.trim_start();
            if let Some(r) = s.strip_prefix(',') {
                s = r;
            } else if !s.starts_with('}') {
                return err(line, "labels must be separated by ','");
            }
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or_else(|| ExpositionError {
        line,
        what: format!("{name}: no value"),
    })?;
    let value = parse_value(value).ok_or_else(|| ExpositionError {
        line,
        what: format!("{name}: '{value}' is not a number"),
    })?;
    if let Some(ts) = fields.next() {
        if ts.parse::<i64>().is_err() {
            return err(line, format!("{name}: '{ts}' is not a timestamp"));
        }
    }
    if fields.next().is_some() {
        return err(line, format!("{name}: text after the timestamp"));
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The family a sample belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if matches!(
                types.get(base).map(String::as_str),
                Some("histogram" | "summary")
            ) {
                return base;
            }
        }
    }
    name
}

/// Parses and checks a whole exposition; returns its families in order.
pub fn check(text: &str) -> Result<Vec<Family>, ExpositionError> {
    let mut families: Vec<Family> = Vec::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut closed: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    let mut helps: HashSet<String> = HashSet::new();
    let last_line = text.lines().count();
    if !text.is_empty() && !text.ends_with('\n') {
        return err(last_line, "the exposition does not end with a newline");
    }
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() {
            continue;
        }
        if let Some(comment) = l.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().unwrap_or("");
                    let kind = parts.next().unwrap_or("").trim();
                    if !valid_name(name, true) {
                        return err(line, format!("TYPE for '{name}', not a metric name"));
                    }
                    if !matches!(
                        kind,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return err(line, format!("{name}: unknown type '{kind}'"));
                    }
                    if types.contains_key(name) {
                        return err(line, format!("{name}: second TYPE line"));
                    }
                    if families.iter().any(|f| f.name == name) {
                        return err(line, format!("{name}: TYPE after its samples"));
                    }
                    if kind == "counter" && !name.ends_with("_total") {
                        return err(line, format!("counter {name} should end in _total"));
                    }
                    types.insert(name.to_string(), kind.to_string());
                }
                Some("HELP") => {
                    let name = parts.next().unwrap_or("");
                    if !valid_name(name, true) {
                        return err(line, format!("HELP for '{name}', not a metric name"));
                    }
                    if !helps.insert(name.to_string()) {
                        return err(line, format!("{name}: second HELP line"));
                    }
                }
                _ => {}
            }
            continue;
        }
        let sample = parse_sample(l, line)?;
        let family = family_of(&sample.name, &types).to_string();
        let Some(kind) = types.get(&family).cloned() else {
            return err(
                line,
                format!("{}: sample before (or without) its TYPE", sample.name),
            );
        };
        let mut key_labels = sample.labels.clone();
        key_labels.sort();
        if !series.insert(format!("{}{key_labels:?}", sample.name)) {
            return err(line, format!("{}: the same series twice", sample.name));
        }
        match families.last_mut() {
            Some(f) if f.name == family => f.samples.push(sample),
            _ => {
                if !closed.insert(family.clone()) {
                    return err(line, format!("{family}: its samples are not together"));
                }
                families.push(Family {
                    name: family,
                    kind,
                    help: None,
                    samples: vec![sample],
                });
            }
        }
    }
    for f in &families {
        if f.kind == "histogram" {
            check_histogram(f)?;
        }
        if f.kind == "counter" && f.samples.iter().any(|s| s.value < 0.0 || s.value.is_nan()) {
            return err(
                last_line,
                format!("counter {} has a negative value", f.name),
            );
        }
    }
    Ok(families)
}

/// One histogram series as read: `(le, cumulative count)` buckets, `_count`, a `_sum` seen.
#[derive(Default)]
struct HistogramSeries {
    buckets: Vec<(f64, f64)>,
    count: Option<f64>,
    sum: bool,
}

fn check_histogram(f: &Family) -> Result<(), ExpositionError> {
    let line = 0;
    // Group by the labels other than `le`.
    let mut groups: HashMap<Vec<(String, String)>, HistogramSeries> = HashMap::new();
    for s in &f.samples {
        let mut others: Vec<(String, String)> = s
            .labels
            .iter()
            .filter(|(k, _)| k != "le")
            .cloned()
            .collect();
        others.sort();
        let g = groups.entry(others).or_default();
        if s.name.ends_with("_bucket") {
            let le = s
                .labels
                .iter()
                .find(|(k, _)| k == "le")
                .and_then(|(_, v)| parse_value(v))
                .ok_or_else(|| ExpositionError {
                    line,
                    what: format!("{}: a bucket without a numeric le", f.name),
                })?;
            g.buckets.push((le, s.value));
        } else if s.name.ends_with("_count") {
            g.count = Some(s.value);
        } else if s.name.ends_with("_sum") {
            g.sum = true;
        } else {
            return err(line, format!("{}: stray sample {}", f.name, s.name));
        }
    }
    for (
        labels,
        HistogramSeries {
            buckets,
            count,
            sum,
        },
    ) in groups
    {
        let what = |w: &str| format!("histogram {} {labels:?}: {w}", f.name);
        if buckets.windows(2).any(|w| w[1].0 <= w[0].0) {
            return err(line, what("le bounds are not ascending"));
        }
        if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
            return err(line, what("bucket counts are not cumulative"));
        }
        match buckets.last() {
            Some((le, n)) if le.is_infinite() => {
                if Some(*n) != count {
                    return err(line, what("the +Inf bucket differs from _count"));
                }
            }
            _ => return err(line, what("no +Inf bucket")),
        }
        if !sum {
            return err(line, what("no _sum"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    const GOOD: &str = "\
# HELP flotilla_remote_faults_total Remote faults.
# TYPE flotilla_remote_faults_total counter
flotilla_remote_faults_total{kind=\"read\",node=\"0\"} 3
flotilla_remote_faults_total{kind=\"write\",node=\"0\"} 4
# TYPE flotilla_pages_resident gauge
flotilla_pages_resident{node=\"0\",note=\"a \\\"b\\\" \\\\ c\"} 12
# TYPE flotilla_fault_service_seconds histogram
flotilla_fault_service_seconds_bucket{node=\"0\",le=\"0.001\"} 1
flotilla_fault_service_seconds_bucket{node=\"0\",le=\"0.01\"} 2
flotilla_fault_service_seconds_bucket{node=\"0\",le=\"+Inf\"} 2
flotilla_fault_service_seconds_sum{node=\"0\"} 0.004
flotilla_fault_service_seconds_count{node=\"0\"} 2
";

    #[test]
    fn a_good_exposition_parses() {
        let f = check(GOOD).unwrap();
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].samples[1].value, 4.0);
        assert_eq!(f[1].samples[0].labels[1].1, "a \"b\" \\ c");
        assert_eq!(f[2].samples.len(), 5);
    }

    #[test]
    fn what_promtool_refuses_is_refused() {
        let cases = [
            ("flotilla_x_total 1\n", "before"),
            ("# TYPE x counter\nx 1\n", "_total"),
            ("# TYPE a gauge\na{l=\"1\"} one\n", "not a number"),
            ("# TYPE a gauge\na{l=1} 1\n", "not quoted"),
            ("# TYPE a gauge\na{l=\"1} 1\n", "unterminated"),
            ("# TYPE a gauge\na 1\na 2\n", "twice"),
            ("# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"1\"} 1\n", "together"),
            ("# TYPE a gauge\n9a 1\n", "metric name"),
            ("# TYPE a gauge\na 1", "newline"),
            ("# TYPE a wobbly\n", "unknown type"),
            ("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", "cumulative"),
            ("# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n", "+Inf"),
            ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n", "differs"),
            ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n", "_sum"),
        ];
        for (text, want) in cases {
            let e = check(text).expect_err(text);
            assert!(e.to_string().contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn the_engine_metrics_pass() {
        let m = crate::metrics::NodeMetrics::new(2);
        m.remote_fault(true);
        m.fault_service(0.0002);
        m.fault_service(0.2);
        let text = m.encode();
        let families = check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(families
            .iter()
            .any(|f| f.name == "flotilla_fault_service_seconds"));
    }
}
