// The wire samples the server's tests write (src/wire/samples.json) against
// the dashboard: `tsc` checks their types (src/wire/samples.check.ts); this
// checks that the typed copy is the written one, and that the dashboard's
// readers take each channel's snapshot and update as the server sends them.
import { describe, expect, it } from 'vitest';
import { campaignsFromChannel } from '../src/ads';
import { applyMessage } from '../src/channel';
import { mergePatch, overviewWindows, type Json } from '../src/data';
import { engagementFromChannel } from '../src/engagement';
import { trendingFromChannel } from '../src/trending';
import written from '../src/wire/samples.json';
import { samples } from '../src/wire/samples.check';

const json = (v: unknown) => v as Json;

describe('wire samples', () => {
  it('the typed copy is the one the server wrote', () => {
    expect(samples).toEqual(written);
  });

  it('every channel update follows its snapshot and merges into it', () => {
    const pairs = [
      [samples.ws_overview_snapshot, samples.ws_overview_update],
      [samples.ws_trending_snapshot, samples.ws_trending_update],
      [samples.ws_campaigns_snapshot, samples.ws_campaigns_update],
      [samples.ws_campaign_snapshot, samples.ws_campaign_update],
      [samples.ws_engagement_snapshot, samples.ws_engagement_update],
    ] as const;
    for (const [snapshot, update] of pairs) {
      expect(update.channel).toBe(snapshot.channel);
      const kept = applyMessage({ seq: null, data: null }, { ...snapshot, data: json(snapshot.data) });
      const step = applyMessage(kept.state, { ...update, data: json(update.data) });
      expect(step.kind, snapshot.channel).toBe('deliver');
      expect(step.state.data).toEqual(mergePatch(json(snapshot.data), json(update.data)));
    }
  });

  it('the readers take what the channels send', () => {
    expect(overviewWindows(json(samples.ws_overview_snapshot.data)).length).toBeGreaterThan(0);
    const trending = trendingFromChannel(json(samples.ws_trending_snapshot.data));
    expect(trending?.tags.map((t) => t.tag)).toEqual(samples.rest_trending.tags.map((t) => t.tag));
    const campaigns = campaignsFromChannel(json(samples.ws_campaigns_snapshot.data));
    expect(campaigns?.rows.map((r) => r.campaign_id).sort()).toEqual(
      samples.rest_campaigns.campaigns.map((c) => c.campaign_id).sort(),
    );
    const engagement = engagementFromChannel(json(samples.ws_engagement_snapshot.data));
    expect(Object.keys(engagement?.bySegment ?? {}).sort()).toEqual(['new', 'returning']);
  });
});
