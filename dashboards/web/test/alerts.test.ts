// The alerts page's reading of the `alerts` channel and of the rules.
import { describe, expect, it } from 'vitest';
import { activeAlerts, describeRule, seriesLabel } from '../src/alerts';

describe('alerts', () => {
  it('lists the channel state firing first', () => {
    const data = {
      alerts: {
        low: { rule: 'low', tags: {}, state: 'pending', value: 60, threshold: 100, since: 's', window: 'w' },
        'busy{country=de}': { rule: 'busy', tags: { country: 'de' }, state: 'firing', value: 7.5, since: 's', window: 'w' },
      },
    };
    const alerts = activeAlerts(data);
    expect(alerts.map((a) => a.key)).toEqual(['busy{country=de}', 'low']);
    expect(alerts[0].threshold).toBeNull();
    expect(seriesLabel(alerts[0].tags)).toBe('country=de');
    expect(seriesLabel(alerts[1].tags)).toBe('all');
    expect(activeAlerts(null)).toEqual([]);
  });

  it('describes each kind of rule in a line', () => {
    expect(
      describeRule({
        name: 'l',
        kind: 'threshold',
        for: 3,
        resolve_for: 1,
        measurement: 'traffic',
        field: 'events',
        where: { event_type: 'like' },
        op: '<',
        value: 100,
      }),
    ).toBe('traffic.events{event_type=like} < 100 for 3 windows');
    expect(describeRule({ name: 'c', kind: 'campaign', for: 1, resolve_for: 1, metric: 'ctr', op: '<', value: 0.01 })).toBe(
      'campaign CTR < 0.01',
    );
  });
});
