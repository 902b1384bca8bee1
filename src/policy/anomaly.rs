//! Impossible travel: the same certificate serial, or a SPIFFE ID configured as single-region,
//! seen from two regions within a window. Pure, with time passed in.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

/// What was seen where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Travel {
    /// `serial` or `spiffe_id`.
    pub kind: &'static str,
    pub key: String,
    pub previous_region: String,
    pub region: String,
}

/// Remembers the last region of each serial and single-region ID.
#[derive(Debug)]
pub struct TravelDetector {
    window: Duration,
    single_region: HashSet<String>,
    serials: HashMap<String, (String, SystemTime)>,
    ids: HashMap<String, (String, SystemTime)>,
}

impl TravelDetector {
    /// Flags changes of region within `window`; `single_region` IDs are also tracked by ID.
    pub fn new(window: Duration, single_region: impl IntoIterator<Item = String>) -> Self {
        TravelDetector {
            window,
            single_region: single_region.into_iter().collect(),
            serials: HashMap::new(),
            ids: HashMap::new(),
        }
    }

    /// Records a sighting; returns the anomalies it reveals.
    pub fn observe(
        &mut self,
        id: &str,
        serial: &str,
        region: Option<&str>,
        at: SystemTime,
    ) -> Vec<Travel> {
        let Some(region) = region else {
            return Vec::new();
        };
        let window = self.window;
        let mut found = Vec::new();
        let mut check =
            |map: &mut HashMap<String, (String, SystemTime)>, kind: &'static str, key: &str| {
                if let Some((prev, when)) = map.get(key) {
                    let recent = at.duration_since(*when).map_or(true, |d| d <= window);
                    if prev != region && recent {
                        found.push(Travel {
                            kind,
                            key: key.to_string(),
                            previous_region: prev.clone(),
                            region: region.to_string(),
                        });
                    }
                }
                map.insert(key.to_string(), (region.to_string(), at));
            };
        check(&mut self.serials, "serial", serial);
        if self.single_region.contains(id) {
            check(&mut self.ids, "spiffe_id", id);
        }
        if self.serials.len() > 100_000 {
            // Forget sightings older than the window rather than grow without bound.
            self.serials
                .retain(|_, (_, t)| at.duration_since(*t).map_or(true, |d| d <= window));
        }
        found
    }

    /// Puts `t`'s key back in the region it was seen in before, as of `at`: the sighting that
    /// revealed `t` was refused, so it is not where the key lives now (otherwise the workload
    /// seen there first would be flagged in turn on its next call).
    pub fn restore(&mut self, t: &Travel, at: SystemTime) {
        let map = match t.kind {
            "serial" => &mut self.serials,
            _ => &mut self.ids,
        };
        map.insert(t.key.clone(), (t.previous_region.clone(), at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_serial_or_single_region_id_from_two_regions_within_the_window() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut d = TravelDetector::new(
            Duration::from_secs(600),
            ["spiffe://td/ns/a/sa/pinned".to_string()],
        );
        assert!(d
            .observe("spiffe://td/ns/a/sa/x", "01", Some("eu"), t0)
            .is_empty());
        let a = d.observe(
            "spiffe://td/ns/a/sa/x",
            "01",
            Some("us"),
            t0 + Duration::from_secs(60),
        );
        assert_eq!(a.len(), 1);
        assert_eq!(
            (
                a[0].kind,
                a[0].previous_region.as_str(),
                a[0].region.as_str()
            ),
            ("serial", "eu", "us")
        );
        // Outside the window: no anomaly.
        assert!(d
            .observe(
                "spiffe://td/ns/a/sa/x",
                "01",
                Some("eu"),
                t0 + Duration::from_secs(3600)
            )
            .is_empty());
        // A pinned ID with two different serials in two regions.
        assert!(d
            .observe("spiffe://td/ns/a/sa/pinned", "02", Some("eu"), t0)
            .is_empty());
        let a = d.observe(
            "spiffe://td/ns/a/sa/pinned",
            "03",
            Some("us"),
            t0 + Duration::from_secs(5),
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].kind, "spiffe_id");
        // An unpinned ID may live in several regions under different serials.
        assert!(d
            .observe(
                "spiffe://td/ns/a/sa/x",
                "04",
                Some("us"),
                t0 + Duration::from_secs(3601)
            )
            .is_empty());
    }
}
