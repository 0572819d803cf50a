//! Unit-test harness: one pipeline's two stages joined directly, so a test
//! feeds events and watermarks and reads points as a single worker would
//! produce them.

use std::time::Duration;

use tidemark_model::{Event, Point, Watermark};

use crate::combiner::Combiner;
use crate::error::ProcessorError;
use crate::partial::Partial;
use crate::pipeline::{Finisher, Pipeline};

/// A stage-1 pipeline feeding a one-worker combiner with its finisher.
pub(crate) struct Solo<P> {
    pub(crate) pipeline: P,
    combiner: Combiner,
    partials: Vec<Partial>,
}

impl<P: Pipeline> Solo<P> {
    pub(crate) fn new(pipeline: P, finisher: impl Finisher + 'static, lateness: Duration) -> Self {
        Solo {
            pipeline,
            combiner: Combiner::new(vec![Box::new(finisher)], 1, lateness),
            partials: Vec::new(),
        }
    }

    pub(crate) fn on_event(&mut self, ev: &Event, _out: &mut Vec<Point>) {
        self.pipeline.on_event(ev);
    }

    pub(crate) fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Point>) {
        self.pipeline.on_watermark(wm, &mut self.partials);
        for p in self.partials.drain(..) {
            self.combiner
                .on_partial(0, p)
                .expect(crate::runner::SAME_SHAPE);
        }
        self.combiner.on_watermark(0, wm, out);
    }

    pub(crate) fn early(&mut self, out: &mut Vec<Point>) {
        self.pipeline.early(&mut self.partials);
        self.combiner
            .on_early(0, std::mem::take(&mut self.partials))
            .expect(crate::runner::SAME_SHAPE);
        self.combiner.early(out);
    }

    pub(crate) fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        let pipeline = self.pipeline.snapshot().expect("pipeline snapshot");
        (
            pipeline,
            self.combiner.snapshot().expect("combiner snapshot"),
        )
    }

    pub(crate) fn restore(&mut self, state: &(Vec<u8>, Vec<u8>)) -> Result<(), ProcessorError> {
        self.pipeline.restore(&state.0)?;
        self.combiner.restore(&state.1)
    }
}
