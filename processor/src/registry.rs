//! The pipelines tidemark knows, each describing itself in one place.
//!
//! A pipeline is a [`PipelineSpec`]: its name, the measurements (and tiers)
//! it writes, how far its state reaches in event time, and builders for its
//! two stages. Live runs, sharded runs, replay and `--verify` only ever go
//! through the spec, so registering a spec is all it takes to run a new
//! pipeline everywhere. [`Registry::builtin`] lists the four built-in ones;
//! [`Registry::with`] adds another (a test's, say).

use std::sync::Arc;
use std::time::Duration;

use crate::ads::{AdsConfig, AdsSpec};
use crate::alerts::AlertRules;
use crate::combiner::Combiner;
use crate::engagement::{EngagementConfig, EngagementSpec};
use crate::patterns::{PatternsConfig, PatternsSpec};
use crate::pipeline::{Finisher, Measurement, Pipeline, PipelineSpec, StateReach};
use crate::traffic::{TrafficSpec, DEFAULT_ALLOWED_LATENESS};
use crate::trending::{TrendingConfig, TrendingSpec};

/// Settings of the built-in pipelines.
#[derive(Debug, Clone, Default)]
pub struct PipelineConfigs {
    pub engagement: EngagementConfig,
    pub trending: TrendingConfig,
    pub ads: AdsConfig,
    pub patterns: PatternsConfig,
}

/// A name that is no registered pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pipeline `{name}` (known: {})", known.join(", "))]
pub struct UnknownPipeline {
    pub name: String,
    pub known: Vec<&'static str>,
}

/// The pipelines that can run, in the order they run.
#[derive(Debug, Clone)]
pub struct Registry {
    specs: Vec<Arc<dyn PipelineSpec>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::builtin(&PipelineConfigs::default())
    }
}

impl Registry {
    /// The built-in pipelines: traffic, engagement, trending, ads and
    /// patterns (the last joined later: checkpoints of the first four still
    /// restore, see [`Combiner::restore`]).
    pub fn builtin(configs: &PipelineConfigs) -> Registry {
        Registry {
            specs: vec![
                Arc::new(TrafficSpec),
                Arc::new(EngagementSpec(configs.engagement.clone())),
                Arc::new(TrendingSpec(configs.trending.clone())),
                Arc::new(AdsSpec(configs.ads)),
                Arc::new(PatternsSpec(configs.patterns.clone())),
            ],
        }
    }

    /// Registers `spec` after the others; a spec of the same name is replaced.
    pub fn with(mut self, spec: Arc<dyn PipelineSpec>) -> Registry {
        match self.specs.iter().position(|s| s.name() == spec.name()) {
            Some(i) => self.specs[i] = spec,
            None => self.specs.push(spec),
        }
        self
    }

    /// The registered names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.specs.iter().map(|s| s.name()).collect()
    }

    /// Every registered pipeline.
    pub fn all(&self, allowed_lateness: Duration) -> PipelineSet {
        PipelineSet {
            specs: self.specs.clone(),
            allowed_lateness,
            alert_rules: None,
        }
    }

    /// The named pipelines, in registration order.
    pub fn select<S: AsRef<str>>(
        &self,
        names: &[S],
        allowed_lateness: Duration,
    ) -> Result<PipelineSet, UnknownPipeline> {
        if let Some(unknown) = names
            .iter()
            .find(|n| !self.specs.iter().any(|s| s.name() == n.as_ref()))
        {
            return Err(UnknownPipeline {
                name: unknown.as_ref().to_string(),
                known: self.names(),
            });
        }
        let specs = self
            .specs
            .iter()
            .filter(|s| names.iter().any(|n| n.as_ref() == s.name()))
            .cloned()
            .collect();
        Ok(PipelineSet {
            specs,
            allowed_lateness,
            alert_rules: None,
        })
    }
}

/// Which pipelines run, with the lateness their windows share. Builds both
/// stages: one stage-1 set per worker and the combiner's finishers, in the
/// same order.
#[derive(Debug, Clone)]
pub struct PipelineSet {
    specs: Vec<Arc<dyn PipelineSpec>>,
    /// How long a fired window still accepts events; must match
    /// [`DriverConfig::allowed_lateness`](crate::DriverConfig::allowed_lateness).
    pub allowed_lateness: Duration,
    /// Business alert rules, evaluated by the combiner over closed windows.
    alert_rules: Option<Arc<AlertRules>>,
}

impl Default for PipelineSet {
    fn default() -> Self {
        PipelineSet::all(DEFAULT_ALLOWED_LATENESS)
    }
}

impl PipelineSet {
    /// Every built-in pipeline, with default settings and the given lateness.
    pub fn all(allowed_lateness: Duration) -> Self {
        Registry::default().all(allowed_lateness)
    }

    /// The named built-in pipelines, with default settings.
    pub fn named<S: AsRef<str>>(
        names: &[S],
        allowed_lateness: Duration,
    ) -> Result<Self, UnknownPipeline> {
        Registry::default().select(names, allowed_lateness)
    }

    /// The pipelines' names, in the order they run.
    pub fn names(&self) -> Vec<&'static str> {
        self.specs.iter().map(|s| s.name()).collect()
    }

    /// The set with `rules` evaluated over its closed windows (none when
    /// empty).
    pub fn with_alert_rules(mut self, rules: Arc<AlertRules>) -> Self {
        self.alert_rules = (!rules.is_empty()).then_some(rules);
        self
    }

    /// The alert rules the combiner evaluates.
    pub fn alert_rules(&self) -> Option<&Arc<AlertRules>> {
        self.alert_rules.as_ref()
    }

    /// Every measurement the pipelines write (and `alerts`, with rules).
    pub fn measurements(&self) -> Vec<Measurement> {
        let alerts = self.alert_rules.as_ref().map(|_| Measurement {
            name: crate::alerts::MEASUREMENT,
            tiers: &[tidemark_model::Tier::Rt],
        });
        self.specs
            .iter()
            .flat_map(|s| s.measurements().iter().copied())
            .chain(alerts)
            .collect()
    }

    /// The longest reach of any of the pipelines, or of the alert rules
    /// beyond the pipelines they read.
    pub fn reach(&self) -> StateReach {
        let pipelines = self
            .specs
            .iter()
            .fold(StateReach::default(), |r, s| r.max(s.reach()));
        let Some(rules) = &self.alert_rules else {
            return pipelines;
        };
        pipelines.max(StateReach {
            back: pipelines.back + rules.reach_back(),
            ahead: pipelines.ahead,
        })
    }

    /// A fresh set of stage-1 pipelines (one per worker).
    pub fn stage1(&self) -> Vec<Box<dyn Pipeline>> {
        self.specs
            .iter()
            .map(|s| s.stage1(self.allowed_lateness))
            .collect()
    }

    /// The combiner's finishers, in the same order as [`PipelineSet::stage1`].
    pub fn stage2(&self) -> Vec<Box<dyn Finisher>> {
        self.specs
            .iter()
            .map(|s| s.stage2(self.allowed_lateness))
            .collect()
    }

    /// A combiner of `workers` workers' partials: the stage-2 finishers,
    /// named, with the alert rules.
    pub fn combiner(&self, workers: usize) -> Combiner {
        let measurements = (self.specs.iter())
            .map(|s| s.measurements().iter().map(|m| m.name).collect())
            .collect();
        let mut combiner = Combiner::new(self.stage2(), workers, self.allowed_lateness)
            .named(self.names())
            .measuring(measurements);
        if let Some(rules) = &self.alert_rules {
            combiner.set_alert_rules(rules.clone());
        }
        combiner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let err = PipelineSet::named(&["traffic", "tides"], DEFAULT_ALLOWED_LATENESS)
            .expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "unknown pipeline `tides` (known: traffic, engagement, trending, ads, patterns)"
        );
    }

    #[test]
    fn selection_keeps_registration_order_and_each_stage_matches_its_spec() {
        let set = PipelineSet::named(&["ads", "traffic"], DEFAULT_ALLOWED_LATENESS).unwrap();
        assert_eq!(set.names(), ["traffic", "ads"]);
        let stage1: Vec<&str> = set.stage1().iter().map(|p| p.name()).collect();
        assert_eq!(stage1, set.names());
        assert_eq!(set.stage2().len(), 2);
        let measurements: Vec<&str> = set.measurements().iter().map(|m| m.name).collect();
        assert_eq!(measurements, ["traffic", "active_users", "ads"]);
    }

    #[test]
    fn the_reach_is_the_longest_of_the_selected_pipelines() {
        let lateness = DEFAULT_ALLOWED_LATENESS;
        let traffic = PipelineSet::named(&["traffic"], lateness).unwrap();
        assert_eq!(traffic.reach(), StateReach::default());
        let configs = PipelineConfigs::default();
        let gap = configs.engagement.session_gap;
        let with_sessions = PipelineSet::named(&["traffic", "engagement"], lateness).unwrap();
        assert_eq!(
            with_sessions.reach(),
            StateReach {
                back: gap,
                ahead: gap
            }
        );
        let ads = configs.ads.attribution_window + configs.ads.conversion_window;
        assert_eq!(PipelineSet::all(lateness).reach().back, ads);
    }
}
