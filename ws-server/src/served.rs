//! Which updates reach the overview: the live processor's while the live
//! database is served, a promoted database's otherwise.
//!
//! `tidemark promote` switches the [`ServingStore`](crate::ServingStore).
//! On every switch the hot cache is rebuilt from the newly served database
//! and its generation goes up, so WebSocket sessions send their clients a
//! fresh snapshot. While a promoted database is served, its last hour is
//! read every [`POLL`] and windows that changed go out as updates; the live
//! processor's updates describe the live database and are held back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tidemark_model::{EventTime, FieldValue, Point, Tier, Update};
use tidemark_tsdb_writer::{Aggregate, MetricQuery, Store, StoreError};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};

use crate::live::{lock, Overview, OVERVIEW_WINDOWS};

/// How often a promoted database is read for changed windows.
pub const POLL: Duration = Duration::from_secs(1);

const WINDOW: Duration = Duration::from_secs(60);

/// An update on its way to sessions, with the generation of the hot cache
/// it belongs to (updates of an older generation are dropped).
pub(crate) type Served = (u64, Update);

/// The database served now, shared by the handlers and [`follow_serving`].
pub(crate) type Serving = watch::Sender<(String, Arc<dyn Store>)>;

/// What live updates feed: the overview's hot cache and the other channels.
pub(crate) struct LiveCaches {
    pub overview: Arc<Mutex<Overview>>,
    pub hub: Arc<crate::channels::Hub>,
}

/// Feeds the hot cache and `served` from the live updates or the served
/// database (see the module documentation) until the serving store is gone.
pub(crate) async fn follow_serving(
    mut serving: watch::Receiver<(String, Arc<dyn Store>)>,
    live_database: Arc<RwLock<String>>,
    mut live: broadcast::Receiver<Update>,
    served: broadcast::Sender<Served>,
    caches: LiveCaches,
    generation: watch::Sender<u64>,
    dropped: prometheus::IntCounter,
) {
    let LiveCaches { overview: hot, hub } = caches;
    let mut promoted: Option<Arc<dyn Store>> = None;
    let mut last: BTreeMap<EventTime, Update> = BTreeMap::new();
    let mut live_open = true;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = serving.changed() => {
                if changed.is_err() {
                    return;
                }
                let (name, store) = serving.borrow_and_update().clone();
                let is_live = *live_database.read().unwrap_or_else(|e| e.into_inner()) == name;
                // The newly served database's newest hour may lie anywhere
                // in the tier's retention (a replay of old history).
                let anchor = newest(&lock(&hot)).unwrap_or_else(EventTime::now);
                last = match stored_windows(store.as_ref(), anchor, Tier::Rt.retention()).await {
                    Ok(windows) => windows,
                    Err(e) => {
                        tracing::warn!(error = %e, database = %name, "Cannot read the overview of the served database");
                        BTreeMap::new()
                    }
                };
                {
                    let mut overview = lock(&hot);
                    *overview = Overview::default();
                    for u in last.values() {
                        overview.apply(u);
                    }
                }
                generation.send_modify(|g| *g += 1);
                // The other channels follow live updates only: they start
                // over, and fill again while the live database is served.
                hub.reset();
                promoted = (!is_live).then_some(store);
            }
            update = live.recv(), if live_open => match update {
                Ok(update) => {
                    if promoted.is_none() {
                        hub.publish(&update);
                        lock(&hot).apply(&update);
                        let _ = served.send((*generation.borrow(), update));
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    // Sessions cannot have these either: they start over from
                    // the hot cache, which later updates complete.
                    tracing::warn!(skipped = n, "The overview fell behind the updates channel");
                    dropped.inc_by(n);
                    generation.send_modify(|g| *g += 1);
                }
                Err(RecvError::Closed) => live_open = false,
            },
            _ = tick.tick(), if promoted.is_some() => {
                let Some(store) = &promoted else { continue };
                let anchor = last.keys().next_back().copied().unwrap_or_else(EventTime::now);
                let windows = match stored_windows(store.as_ref(), anchor, WINDOW * OVERVIEW_WINDOWS as u32).await {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot read the promoted database");
                        continue;
                    }
                };
                let current = *generation.borrow();
                for (start, update) in &windows {
                    if last.get(start).map(|u| &u.points) != Some(&update.points) {
                        lock(&hot).apply(update);
                        let _ = served.send((current, update.clone()));
                    }
                }
                last = windows;
            }
        }
    }
}

fn newest(overview: &Overview) -> Option<EventTime> {
    overview.windows().map(|(start, _)| start).last()
}

/// The newest hour of the overview's windows in `store`, looking from
/// `lookback` before `anchor` (the newest window known), or before now, up
/// to now.
async fn stored_windows(
    store: &dyn Store,
    anchor: EventTime,
    lookback: Duration,
) -> Result<BTreeMap<EventTime, Update>, StoreError> {
    let now = EventTime::now();
    let from = anchor.min(now).minus(lookback);
    let to = anchor.max(now).plus(WINDOW);
    let query = |measurement: &str, field: &str, group_by: &[&str]| MetricQuery {
        measurement: measurement.to_string(),
        field: field.to_string(),
        tier: Tier::Rt,
        from,
        to,
        filters: Vec::new(),
        group_by: group_by.iter().map(|g| g.to_string()).collect(),
        aggregate: Aggregate::Sum,
    };
    let mut windows: BTreeMap<EventTime, Update> = BTreeMap::new();
    let mut add = |time: EventTime, point: Point| {
        windows
            .entry(time.floor(WINDOW))
            .or_insert_with(|| Update {
                window_start: time.floor(WINDOW),
                is_final: true,
                newest_received_at: EventTime(0),
                points: Vec::new(),
            })
            .points
            .push(point);
    };
    for series in store
        .query(&query("traffic", "events", &["event_type"]))
        .await?
    {
        let kind = series.tags.get("event_type").cloned().unwrap_or_default();
        for (time, v) in series.points {
            let tags = vec![("event_type".to_string(), kind.clone())];
            let fields = vec![("events".to_string(), FieldValue::Float(v))];
            add(time, Point::new("traffic", Tier::Rt, time, tags, fields));
        }
    }
    for series in store.query(&query("active_users", "users", &[])).await? {
        for (time, v) in series.points {
            let fields = vec![("users".to_string(), FieldValue::Float(v))];
            add(
                time,
                Point::new("active_users", Tier::Rt, time, Vec::new(), fields),
            );
        }
    }
    // Keep what the overview keeps: the newest hour.
    if let Some(&newest) = windows.keys().next_back() {
        let oldest = newest.minus(WINDOW * (OVERVIEW_WINDOWS as u32 - 1));
        windows = windows.split_off(&oldest);
    }
    Ok(windows)
}
