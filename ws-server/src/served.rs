//! Which updates reach the live channels: the live processor's while the
//! live database is served, a promoted database's otherwise.
//!
//! `tidemark promote` switches the [`ServingStore`](crate::ServingStore).
//! On start and on every switch the hub starts over from the served
//! database ([`Seed`]: the overview's newest hour, today's campaign
//! totals), and subscribers of every channel whose data that changes get a
//! fresh snapshot. While a promoted database is served, its last hour is
//! read every [`POLL`] and overview windows that changed go out as updates;
//! the live processor's updates describe the live database and are held
//! back.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tidemark_model::{EventTime, FieldValue, Point, Tier, Update};
use tidemark_tsdb_writer::{Aggregate, MetricQuery, Store, StoreError};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};

use crate::channels::{Hub, Seed};
use crate::overview::OVERVIEW_WINDOWS;
use crate::pipelines::{fetch, start_of_day, ADS_COUNTS, ADS_TAGS};

/// How often a promoted database is read for changed windows.
pub const POLL: Duration = Duration::from_secs(1);

const WINDOW: Duration = Duration::from_secs(60);

const DAY: Duration = Duration::from_secs(24 * 3600);

/// The database served now, shared by the handlers and [`follow_serving`].
pub(crate) type Serving = watch::Sender<(String, Arc<dyn Store>)>;

/// Feeds `hub` from the served database and the live updates (see the
/// module documentation) until the serving store is gone.
pub(crate) async fn follow_serving(
    mut serving: watch::Receiver<(String, Arc<dyn Store>)>,
    live_database: Arc<RwLock<String>>,
    mut live: broadcast::Receiver<Update>,
    hub: Arc<Hub>,
    dropped: prometheus::IntCounter,
) {
    let is_live = |name: &str| *live_database.read().unwrap_or_else(|e| e.into_inner()) == name;
    // Live updates wait in `live` meanwhile: nothing is missed, and a
    // minute both stored and updated replaces itself.
    let (name, store) = serving.borrow_and_update().clone();
    let mut last = reseed(&hub, &name, store.as_ref()).await;
    let mut promoted: Option<Arc<dyn Store>> = (!is_live(&name)).then_some(store);
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
                last = reseed(&hub, &name, store.as_ref()).await;
                promoted = (!is_live(&name)).then_some(store);
            }
            update = live.recv(), if live_open => match update {
                Ok(update) => {
                    if promoted.is_none() {
                        hub.publish(&update);
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "The live channels fell behind the updates channel");
                    dropped.inc_by(n);
                    // A missed final minute would be missing from today's
                    // totals for good: start over from what is stored.
                    if promoted.is_none() {
                        let (name, store) = serving.borrow().clone();
                        last = reseed(&hub, &name, store.as_ref()).await;
                    }
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
                for (start, update) in &windows {
                    if last.get(start).map(|u| &u.points) != Some(&update.points) {
                        hub.publish(update);
                    }
                }
                last = windows;
            }
        }
    }
}

/// Starts the hub over from `store` (served as `name`) and gives the
/// overview windows it read.
async fn reseed(hub: &Hub, name: &str, store: &dyn Store) -> BTreeMap<EventTime, Update> {
    // The served database's newest hour may lie anywhere in the tier's
    // retention (a replay of old history).
    let anchor = hub.overview().newest().unwrap_or_else(EventTime::now);
    let windows = match stored_windows(store, anchor, Tier::Rt.retention()).await {
        Ok(windows) => windows,
        Err(e) => {
            tracing::warn!(error = %e, database = %name, "Cannot read the overview of the served database");
            BTreeMap::new()
        }
    };
    let day = start_of_day(EventTime::now());
    let ads = match fetch(
        store,
        "ads",
        Tier::Rt,
        (day, day.plus(DAY)),
        &[],
        &ADS_TAGS,
        &ADS_COUNTS,
    )
    .await
    {
        Ok(rows) => Some((day, rows)),
        Err(e) => {
            tracing::warn!(error = %e, database = %name, "Cannot read today's campaign totals of the served database");
            None
        }
    };
    hub.reset(&Seed {
        overview: windows.values().cloned().collect(),
        ads,
    });
    windows
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
