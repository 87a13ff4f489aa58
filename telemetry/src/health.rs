//! Hardware health signals, read from `/sys` where the kernel offers them:
//!
//! | signal | source |
//! |---|---|
//! | `edac_correctable_errors` | sum of `devices/system/edac/mc/mc*/ce_count` |
//! | `edac_uncorrectable_errors` | sum of `devices/system/edac/mc/mc*/ue_count` |
//! | `thermal_max_celsius` | highest `class/thermal/thermal_zone*/temp` (millidegrees) |
//! | `thermal_zones` | number of thermal zones read |
//! | `nic_rx_errors`, `nic_tx_errors`, `nic_rx_dropped`, `nic_tx_dropped` | sums of `class/net/*/statistics/*` over every interface but `lo` |
//!
//! A signal whose source does not exist on this machine is left out (not reported as 0):
//! a dashboard then shows "no data" rather than a reassuring zero. Injected values
//! ([`HealthReader::inject`]) override or add signals, for tests and drills.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Reads the signals; see the module documentation.
pub struct HealthReader {
    sysfs: PathBuf,
    injected: Mutex<BTreeMap<String, f64>>,
}

/// Parses `SIGNAL=VALUE`, as `--inject-health` takes it.
pub fn parse_injection(s: &str) -> Result<(String, f64), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("health injection '{s}': expected SIGNAL=VALUE"))?;
    let name = name.trim();
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!(
            "health injection '{s}': the signal name must be 1 to 64 characters of a-z, 0-9 and _"
        ));
    }
    let value: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("health injection '{s}': '{value}' is not a number"))?;
    if !value.is_finite() {
        return Err(format!("health injection '{s}': the value must be finite"));
    }
    Ok((name.to_string(), value))
}

fn read_number(path: &Path) -> Option<f64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Entries of `dir` whose names start with `prefix`, sorted.
fn entries(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

impl HealthReader {
    /// Reads from the real `/sys`.
    pub fn new() -> Self {
        Self::with_root("/sys")
    }

    /// Reads from another tree laid out like `/sys` (tests, containers).
    pub fn with_root(sysfs: impl Into<PathBuf>) -> Self {
        HealthReader {
            sysfs: sysfs.into(),
            injected: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets `signal` to `value` from now on, whatever `/sys` says.
    pub fn inject(&self, signal: &str, value: f64) {
        self.injected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(signal.to_string(), value);
    }

    /// Every signal present, by name.
    pub fn read(&self) -> Vec<(String, f64)> {
        let mut out = BTreeMap::new();
        let mc = entries(&self.sysfs.join("devices/system/edac/mc"), "mc");
        if !mc.is_empty() {
            for (file, name) in [
                ("ce_count", "edac_correctable_errors"),
                ("ue_count", "edac_uncorrectable_errors"),
            ] {
                let sum: f64 = mc.iter().filter_map(|d| read_number(&d.join(file))).sum();
                out.insert(name.to_string(), sum);
            }
        }
        let zones: Vec<f64> = entries(&self.sysfs.join("class/thermal"), "thermal_zone")
            .iter()
            .filter_map(|z| read_number(&z.join("temp")))
            .collect();
        if !zones.is_empty() {
            let max = zones.iter().cloned().fold(f64::MIN, f64::max);
            out.insert("thermal_max_celsius".to_string(), max / 1000.0);
            out.insert("thermal_zones".to_string(), zones.len() as f64);
        }
        let nics: Vec<PathBuf> = entries(&self.sysfs.join("class/net"), "")
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n != "lo"))
            .collect();
        if !nics.is_empty() {
            for stat in ["rx_errors", "tx_errors", "rx_dropped", "tx_dropped"] {
                let sum: f64 = nics
                    .iter()
                    .filter_map(|n| read_number(&n.join("statistics").join(stat)))
                    .sum();
                out.insert(format!("nic_{stat}"), sum);
            }
        }
        for (k, v) in self
            .injected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            out.insert(k.clone(), *v);
        }
        out.into_iter().collect()
    }
}

impl Default for HealthReader {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn reads_a_sysfs_tree_and_injections() {
        let root = std::env::temp_dir().join(format!("flotilla-health-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        write(&root, "devices/system/edac/mc/mc0/ce_count", "3\n");
        write(&root, "devices/system/edac/mc/mc0/ue_count", "0\n");
        write(&root, "devices/system/edac/mc/mc1/ce_count", "4\n");
        write(&root, "devices/system/edac/mc/mc1/ue_count", "1\n");
        write(&root, "class/thermal/thermal_zone0/temp", "45000\n");
        write(&root, "class/thermal/thermal_zone1/temp", "61500\n");
        write(&root, "class/thermal/thermal_zone2/temp", "garbage\n");
        write(&root, "class/net/eth0/statistics/rx_errors", "2\n");
        write(&root, "class/net/eth1/statistics/rx_errors", "5\n");
        write(&root, "class/net/lo/statistics/rx_errors", "100\n");
        let h = HealthReader::with_root(&root);
        let got: BTreeMap<String, f64> = h.read().into_iter().collect();
        assert_eq!(got["edac_correctable_errors"], 7.0);
        assert_eq!(got["edac_uncorrectable_errors"], 1.0);
        assert_eq!(got["thermal_max_celsius"], 61.5);
        assert_eq!(got["thermal_zones"], 2.0);
        assert_eq!(got["nic_rx_errors"], 7.0);
        assert_eq!(got["nic_tx_errors"], 0.0);
        h.inject("thermal_max_celsius", 99.0);
        h.inject("fan_failures", 1.0);
        let got: BTreeMap<String, f64> = h.read().into_iter().collect();
        assert_eq!(got["thermal_max_celsius"], 99.0);
        assert_eq!(got["fan_failures"], 1.0);
        std::fs::remove_dir_all(&root).unwrap();
        // Nothing there: nothing reported.
        assert!(HealthReader::with_root("/nonexistent-sysfs")
            .read()
            .is_empty());
    }

    #[test]
    fn injections_are_validated() {
        assert_eq!(
            parse_injection("edac_uncorrectable_errors=2"),
            Ok(("edac_uncorrectable_errors".into(), 2.0))
        );
        assert!(parse_injection("novalue").is_err());
        assert!(parse_injection("Bad-Name=1").is_err());
        assert!(parse_injection("x=hot")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_injection("x=inf").is_err());
        assert!(parse_injection("=1").is_err());
    }
}
