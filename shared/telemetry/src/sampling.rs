//! Head sampling: whether a request's trace is recorded is decided once, where the request
//! enters the system (the gateway), from the standard `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG`. Every later service records a request's spans only when the
//! message it received carries a sampled trace context (see [`crate::propagation`]), so a
//! request that is not sampled costs no span, no trace header and no export anywhere.

use std::sync::OnceLock;

/// The sampler the standard variables name (the OpenTelemetry SDK's values and defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadSampler {
    /// Fraction of new traces recorded, in 0..=1 (1 for `always_on`, 0 for `always_off`).
    ratio: f64,
    /// Whether a request that arrives with a trace context of its own follows that context's
    /// sampled flag (the `parentbased_*` samplers) instead of the ratio.
    parent_based: bool,
}

impl Default for HeadSampler {
    /// `parentbased_always_on`, the OpenTelemetry default.
    fn default() -> Self {
        HeadSampler {
            ratio: 1.0,
            parent_based: true,
        }
    }
}

impl HeadSampler {
    /// The sampler named by `OTEL_TRACES_SAMPLER` (`sampler`) and `OTEL_TRACES_SAMPLER_ARG`
    /// (`arg`). An unknown name or a ratio outside 0..=1 is an error; the message says what
    /// was expected.
    pub fn parse(sampler: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim) {
                None | Some("") => Ok(1.0),
                Some(text) => text
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        format!("OTEL_TRACES_SAMPLER_ARG={text:?} is not a ratio between 0 and 1")
                    }),
            }
        };
        let (ratio, parent_based) = match sampler.map(str::trim) {
            None | Some("") | Some("parentbased_always_on") => (1.0, true),
            Some("parentbased_always_off") => (0.0, true),
            Some("parentbased_traceidratio") => (ratio()?, true),
            Some("always_on") => (1.0, false),
            Some("always_off") => (0.0, false),
            Some("traceidratio") => (ratio()?, false),
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other:?} is not supported (always_on, always_off, \
                     traceidratio, parentbased_always_on, parentbased_always_off, \
                     parentbased_traceidratio)"
                ));
            }
        };
        Ok(HeadSampler {
            ratio,
            parent_based,
        })
    }

    /// The sampler the environment names.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok();
        Self::parse(
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
    }

    /// Whether to record a request's trace: `parent` is the sampled flag of a trace context
    /// the request arrived with, if any; `draw` is uniform in 0..1.
    pub fn sample(&self, parent: Option<bool>, draw: f64) -> bool {
        match parent {
            Some(sampled) if self.parent_based => sampled,
            _ => draw < self.ratio,
        }
    }
}

/// The process's sampler; set once when span export starts, absent when nothing is exported.
static SAMPLER: OnceLock<HeadSampler> = OnceLock::new();

/// Makes `sampler` decide which new requests are traced in this process. Only the first call
/// has an effect.
pub(crate) fn install(sampler: HeadSampler) {
    let _ = SAMPLER.set(sampler);
}

/// Whether a request entering the system here is traced (never when spans are not exported).
/// `parent` is the sampled flag of a trace context the request arrived with, if any.
pub fn sample_request(parent: Option<bool>) -> bool {
    SAMPLER
        .get()
        .is_some_and(|sampler| sampler.sample(parent, rand::random::<f64>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_names_parse_with_the_sdk_defaults() {
        assert_eq!(HeadSampler::parse(None, None), Ok(HeadSampler::default()));
        let ratio = HeadSampler::parse(Some("parentbased_traceidratio"), Some("0.25")).unwrap();
        assert_eq!(ratio.ratio, 0.25);
        assert!(ratio.parent_based);
        let off = HeadSampler::parse(Some("always_off"), Some("0.5")).unwrap();
        assert_eq!(off.ratio, 0.0);
        assert!(!off.parent_based);
        assert_eq!(
            HeadSampler::parse(Some("traceidratio"), None)
                .unwrap()
                .ratio,
            1.0
        );
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let unknown = HeadSampler::parse(Some("sometimes"), None).unwrap_err();
        assert!(unknown.contains("sometimes"), "{unknown}");
        let ratio = HeadSampler::parse(Some("traceidratio"), Some("1.5")).unwrap_err();
        assert!(ratio.contains("1.5"), "{ratio}");
        assert!(HeadSampler::parse(Some("traceidratio"), Some("half")).is_err());
    }

    #[test]
    fn ratio_applies_to_new_traces_and_parent_based_follows_the_parent() {
        let tenth = HeadSampler::parse(Some("parentbased_traceidratio"), Some("0.1")).unwrap();
        let sampled = (0..1000)
            .filter(|i| tenth.sample(None, f64::from(*i) / 1000.0))
            .count();
        assert_eq!(sampled, 100);
        assert!(tenth.sample(Some(true), 0.99));
        assert!(!tenth.sample(Some(false), 0.0));
        let plain = HeadSampler::parse(Some("traceidratio"), Some("0.1")).unwrap();
        assert!(!plain.sample(Some(true), 0.99));
        assert!(plain.sample(Some(false), 0.0));
    }
}
