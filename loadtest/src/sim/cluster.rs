//! Which cluster the simulator runs: a number of GPUs of one cost profile.

use preble_costmodel::Profile;
use preble_policy::workers::MAX_WORKERS;

/// A cluster of identical serving units.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSpec {
    /// The name it was asked by.
    pub name: String,
    /// Serving units (GPUs divided by the profile's tensor-parallel degree).
    pub units: usize,
    /// The profile of every unit.
    pub profile: Profile,
}

/// The paper's two clusters, by their names in the issue and the paper.
const ALIASES: [(&str, &str); 2] = [
    ("4xA6000-mistral7b", "4xa6000-mistral-7b"),
    ("8xH100-llama3-70b", "8xh100-tp4-llama3-70b"),
];

impl std::str::FromStr for ClusterSpec {
    type Err = String;

    /// `<GPUs>x<profile>`, e.g. `4xa6000-mistral-7b` or `8xh100-tp4-llama3-70b` (two units
    /// of four GPUs each); also the aliases `4xA6000-mistral7b` and `8xH100-llama3-70b`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let resolved = ALIASES
            .iter()
            .find(|(alias, _)| alias.eq_ignore_ascii_case(s))
            .map_or(s, |(_, name)| name);
        let (count, profile) = resolved
            .split_once('x')
            .ok_or_else(|| format!("cluster {s:?} is not <GPUs>x<profile>"))?;
        let gpus: usize = count
            .parse()
            .map_err(|_| format!("cluster {s:?}: {count:?} is not a number of GPUs"))?;
        let profile = Profile::by_name(profile).map_err(|e| e.to_string())?;
        let tp = profile.tensor_parallel as usize;
        if gpus == 0 || !gpus.is_multiple_of(tp) {
            return Err(format!(
                "cluster {s:?}: {gpus} GPUs do not split into units of {tp} (the profile's tensor parallelism)"
            ));
        }
        let units = gpus / tp;
        if units > MAX_WORKERS {
            return Err(format!(
                "cluster {s:?}: {units} units; one scheduler routes to at most {MAX_WORKERS}"
            ));
        }
        Ok(Self {
            name: s.to_string(),
            units,
            profile,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_to_units() {
        let a: ClusterSpec = "4xA6000-mistral7b".parse().unwrap();
        assert_eq!((a.units, a.profile.name), (4, "a6000-mistral-7b"));
        let h: ClusterSpec = "8xH100-llama3-70b".parse().unwrap();
        assert_eq!((h.units, h.profile.tensor_parallel), (2, 4));
        let t: ClusterSpec = "8xh100-tp2-llama3-70b".parse().unwrap();
        assert_eq!(t.units, 4);
        assert!("3xh100-tp2-llama3-70b".parse::<ClusterSpec>().is_err());
        assert!("4xtpu".parse::<ClusterSpec>().is_err());
        assert!("many".parse::<ClusterSpec>().is_err());
        assert_eq!(
            "256xa6000-mistral-7b".parse::<ClusterSpec>().unwrap().units,
            256
        );
        let e = "512xa6000-mistral-7b".parse::<ClusterSpec>().unwrap_err();
        assert!(e.contains("at most 256"), "{e}");
    }
}
