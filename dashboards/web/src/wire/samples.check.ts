// Written by ws-server/tests/wire.rs from samples.json: do not edit. Every
// sample is an object literal typed with its declared wire type, so `tsc`
// fails on a field that is missing, renamed, added or of another type.
import type { WireSamples } from './types';

export const samples: WireSamples = {
  "rest_audit": {
    "entries": [
      {
        "action": "login",
        "actor": "user:admin",
        "client": null,
        "detail": {
          "role": "admin"
        },
        "prev": "0000000000000000000000000000000000000000000000000000000000000000",
        "time": "2026-12-03T10:12:00.123Z"
      }
    ],
    "truncated": false
  },
  "rest_auth_login": {
    "access_token": "<access token>",
    "expires_in": 900,
    "name": "admin",
    "refresh_expires_in": 43200,
    "refresh_token": "<refresh token>",
    "role": "admin",
    "token_type": "Bearer"
  },
  "rest_campaign": {
    "campaign_id": "c7",
    "group_by": "device",
    "series": [
      {
        "points": [
          {
            "clicks": 31,
            "clicks_unattributed": 2,
            "conversions": 4,
            "cpa": 3.125,
            "ctr": 0.031,
            "cvr": 0.12903225806451613,
            "impressions": 1000,
            "revenue": 80,
            "roas": 6.4,
            "spend": 12.5,
            "t": "2026-12-03T00:00:00Z"
          },
          {
            "clicks": 62,
            "clicks_unattributed": 2,
            "conversions": 8,
            "cpa": 3.125,
            "ctr": 0.031,
            "cvr": 0.12903225806451613,
            "impressions": 2000,
            "revenue": 160,
            "roas": 6.4,
            "spend": 25,
            "t": "2026-12-03T00:01:00Z"
          }
        ],
        "tags": {
          "device": "ios"
        }
      },
      {
        "points": [
          {
            "clicks": 31,
            "clicks_unattributed": 2,
            "conversions": 4,
            "cpa": 3.125,
            "ctr": 0.0775,
            "cvr": 0.12903225806451613,
            "impressions": 400,
            "revenue": 80,
            "roas": 6.4,
            "spend": 12.5,
            "t": "2026-12-03T00:00:00Z"
          },
          {
            "clicks": 62,
            "clicks_unattributed": 2,
            "conversions": 8,
            "cpa": 3.125,
            "ctr": 0.0775,
            "cvr": 0.12903225806451613,
            "impressions": 800,
            "revenue": 160,
            "roas": 6.4,
            "spend": 25,
            "t": "2026-12-03T00:01:00Z"
          }
        ],
        "tags": {
          "device": "web"
        }
      }
    ],
    "step": "1m"
  },
  "rest_campaigns": {
    "campaigns": [
      {
        "campaign_id": "c7",
        "clicks": 186,
        "clicks_unattributed": 8,
        "conversions": 24,
        "cpa": 3.125,
        "ctr": 0.04428571428571428,
        "cvr": 0.12903225806451613,
        "impressions": 4200,
        "revenue": 480,
        "roas": 6.4,
        "spend": 75
      },
      {
        "campaign_id": "c9",
        "clicks": 0,
        "clicks_unattributed": 0,
        "conversions": 0,
        "cpa": null,
        "ctr": 0,
        "cvr": null,
        "impressions": 150,
        "revenue": 0,
        "roas": 0,
        "spend": 1.5
      }
    ],
    "from": "2026-12-03T00:00:00Z",
    "step": "1m",
    "to": "2026-12-03T00:02:00Z"
  },
  "rest_engagement": {
    "group_by": "segment",
    "series": [
      {
        "points": [
          {
            "active_sessions": 12,
            "avg_session_seconds": 95.5,
            "engagement_score": 90,
            "events_per_session": 7.25,
            "sessions_ended": 2,
            "sessions_started": 4,
            "t": "2026-12-03T00:00:00Z"
          },
          {
            "active_sessions": 24,
            "avg_session_seconds": 95.5,
            "engagement_score": 180,
            "events_per_session": 7.25,
            "sessions_ended": 4,
            "sessions_started": 8,
            "t": "2026-12-03T00:01:00Z"
          }
        ],
        "tags": {
          "segment": "new"
        }
      },
      {
        "points": [
          {
            "active_sessions": 5,
            "avg_session_seconds": null,
            "engagement_score": 20,
            "events_per_session": null,
            "sessions_ended": 0,
            "sessions_started": 1,
            "t": "2026-12-03T00:00:00Z"
          },
          {
            "active_sessions": 10,
            "avg_session_seconds": null,
            "engagement_score": 40,
            "events_per_session": null,
            "sessions_ended": 0,
            "sessions_started": 2,
            "t": "2026-12-03T00:01:00Z"
          }
        ],
        "tags": {
          "segment": "returning"
        }
      }
    ],
    "step": "1m"
  },
  "rest_error": {
    "code": "bad_request",
    "error": "window must be 1m, 5m or 15m, got \"7m\""
  },
  "rest_metrics": {
    "field": "events",
    "name": "traffic",
    "series": [
      {
        "points": [
          {
            "t": "2026-12-03T00:00:00Z",
            "v": 40
          },
          {
            "t": "2026-12-03T00:01:00Z",
            "v": 80
          }
        ],
        "tags": {
          "event_type": "like"
        }
      },
      {
        "points": [
          {
            "t": "2026-12-03T00:00:00Z",
            "v": 100
          },
          {
            "t": "2026-12-03T00:01:00Z",
            "v": 200
          }
        ],
        "tags": {
          "event_type": "view"
        }
      }
    ],
    "step": "1m"
  },
  "rest_query": {
    "columns": [
      "event_type",
      "events"
    ],
    "elapsed_ms": 1.25,
    "points_read": 4,
    "row_count": 2,
    "rows": [
      [
        "like",
        120
      ],
      [
        "view",
        300
      ]
    ],
    "truncated": false
  },
  "rest_query_tables": {
    "tables": [
      {
        "columns": [
          "time",
          "tier",
          "country",
          "device",
          "event_type",
          "events"
        ],
        "fields": [
          "events"
        ],
        "name": "traffic",
        "tags": [
          "country",
          "device",
          "event_type"
        ]
      },
      {
        "columns": [
          "time",
          "tier",
          "users"
        ],
        "fields": [
          "users"
        ],
        "name": "active_users",
        "tags": []
      },
      {
        "columns": [
          "time",
          "tier",
          "country",
          "segment",
          "sessions_started",
          "sessions_ended",
          "active_sessions",
          "engagement_score",
          "avg_session_seconds",
          "events_per_session"
        ],
        "fields": [
          "sessions_started",
          "sessions_ended",
          "active_sessions",
          "engagement_score",
          "avg_session_seconds",
          "events_per_session"
        ],
        "name": "engagement",
        "tags": [
          "country",
          "segment"
        ]
      },
      {
        "columns": [
          "time",
          "tier",
          "tag",
          "window",
          "rank",
          "score",
          "users",
          "events"
        ],
        "fields": [
          "rank",
          "score",
          "users",
          "events"
        ],
        "name": "trending",
        "tags": [
          "tag",
          "window"
        ]
      },
      {
        "columns": [
          "time",
          "tier",
          "campaign_id",
          "country",
          "device",
          "impressions",
          "clicks",
          "clicks_unattributed",
          "conversions",
          "spend",
          "revenue"
        ],
        "fields": [
          "impressions",
          "clicks",
          "clicks_unattributed",
          "conversions",
          "spend",
          "revenue"
        ],
        "name": "ads",
        "tags": [
          "campaign_id",
          "country",
          "device"
        ]
      }
    ],
    "tiers": [
      "rt",
      "hourly",
      "daily"
    ]
  },
  "rest_serving": {
    "database": "tidemark",
    "live_database": "tidemark",
    "store": "sqlite"
  },
  "rest_serving_history": {
    "database": "tidemark",
    "history": [
      {
        "action": "rollback",
        "by": "cli:alice",
        "database": "tidemark",
        "previous": "v2",
        "time": "2026-12-03T09:30:00Z"
      },
      {
        "action": "promote",
        "by": "cli:alice",
        "database": "v2",
        "previous": "tidemark",
        "time": "2026-12-03T09:00:00Z"
      }
    ],
    "live_database": "tidemark"
  },
  "rest_token_created": {
    "id": "<id>",
    "name": "grafana",
    "role": "analyst",
    "token": "tmk_<id>_<secret>"
  },
  "rest_tokens": {
    "tokens": [
      {
        "created": "2026-12-03T10:12:00Z",
        "id": "<id>",
        "name": "grafana",
        "role": "analyst"
      }
    ]
  },
  "rest_trending": {
    "end": "2026-12-03T00:06:00Z",
    "final": true,
    "start": "2026-12-03T00:01:00Z",
    "tags": [
      {
        "events": 720,
        "rank": 1,
        "score": 6,
        "tag": "rust",
        "users": 240
      },
      {
        "events": 480,
        "rank": 2,
        "score": 4,
        "tag": "kappa",
        "users": 160
      }
    ],
    "window": "5m"
  },
  "rest_trending_empty": {
    "end": "2026-12-03T00:02:00Z",
    "final": true,
    "start": "2026-12-03T00:01:00Z",
    "tags": [],
    "window": "1m"
  },
  "rest_trending_tag": {
    "from": "2026-12-03T00:00:00Z",
    "points": [
      {
        "events": 360,
        "rank": 1,
        "score": 3,
        "t": "2026-12-03T00:00:00Z",
        "users": 120
      },
      {
        "events": 720,
        "rank": 1,
        "score": 6,
        "t": "2026-12-03T00:01:00Z",
        "users": 240
      }
    ],
    "tag": "rust",
    "to": "2026-12-03T00:02:00Z",
    "window": "5m"
  },
  "rest_users": {
    "users": [
      {
        "name": "admin",
        "role": "admin"
      }
    ]
  },
  "ws_authenticated": {
    "role": "admin",
    "type": "authenticated"
  },
  "ws_campaign_snapshot": {
    "channel": "campaign:c7",
    "data": {
      "campaign_id": "c7",
      "current": {
        "by_country": {
          "DE": {
            "clicks": 62,
            "clicks_unattributed": 2,
            "conversions": 8,
            "cpa": 3.125,
            "ctr": 0.031,
            "cvr": 0.12903225806451613,
            "impressions": 2000,
            "revenue": 160,
            "roas": 6.4,
            "spend": 25
          },
          "US": {
            "clicks": 62,
            "clicks_unattributed": 2,
            "conversions": 8,
            "cpa": 3.125,
            "ctr": 0.0775,
            "cvr": 0.12903225806451613,
            "impressions": 800,
            "revenue": 160,
            "roas": 6.4,
            "spend": 25
          }
        },
        "by_device": {
          "ios": {
            "clicks": 62,
            "clicks_unattributed": 2,
            "conversions": 8,
            "cpa": 3.125,
            "ctr": 0.031,
            "cvr": 0.12903225806451613,
            "impressions": 2000,
            "revenue": 160,
            "roas": 6.4,
            "spend": 25
          },
          "web": {
            "clicks": 62,
            "clicks_unattributed": 2,
            "conversions": 8,
            "cpa": 3.125,
            "ctr": 0.0775,
            "cvr": 0.12903225806451613,
            "impressions": 800,
            "revenue": 160,
            "roas": 6.4,
            "spend": 25
          }
        },
        "total": {
          "clicks": 124,
          "clicks_unattributed": 4,
          "conversions": 16,
          "cpa": 3.125,
          "ctr": 0.04428571428571428,
          "cvr": 0.12903225806451613,
          "impressions": 2800,
          "revenue": 320,
          "roas": 6.4,
          "spend": 50
        }
      },
      "day": "2026-12-03T00:00:00Z",
      "final": true,
      "minute": "2026-12-03T00:01:00Z",
      "today": {
        "by_country": {
          "DE": {
            "clicks": 93,
            "clicks_unattributed": 4,
            "conversions": 12,
            "cpa": 3.125,
            "ctr": 0.031,
            "cvr": 0.12903225806451613,
            "impressions": 3000,
            "revenue": 240,
            "roas": 6.4,
            "spend": 37.5
          },
          "US": {
            "clicks": 93,
            "clicks_unattributed": 4,
            "conversions": 12,
            "cpa": 3.125,
            "ctr": 0.0775,
            "cvr": 0.12903225806451613,
            "impressions": 1200,
            "revenue": 240,
            "roas": 6.4,
            "spend": 37.5
          }
        },
        "by_device": {
          "ios": {
            "clicks": 93,
            "clicks_unattributed": 4,
            "conversions": 12,
            "cpa": 3.125,
            "ctr": 0.031,
            "cvr": 0.12903225806451613,
            "impressions": 3000,
            "revenue": 240,
            "roas": 6.4,
            "spend": 37.5
          },
          "web": {
            "clicks": 93,
            "clicks_unattributed": 4,
            "conversions": 12,
            "cpa": 3.125,
            "ctr": 0.0775,
            "cvr": 0.12903225806451613,
            "impressions": 1200,
            "revenue": 240,
            "roas": 6.4,
            "spend": 37.5
          }
        },
        "total": {
          "clicks": 186,
          "clicks_unattributed": 8,
          "conversions": 24,
          "cpa": 3.125,
          "ctr": 0.04428571428571428,
          "cvr": 0.12903225806451613,
          "impressions": 4200,
          "revenue": 480,
          "roas": 6.4,
          "spend": 75
        }
      }
    },
    "seq": 7,
    "type": "snapshot"
  },
  "ws_campaign_update": {
    "channel": "campaign:c7",
    "data": {
      "current": {
        "by_country": {
          "DE": {
            "clicks": 93,
            "conversions": 12,
            "impressions": 3000,
            "revenue": 240,
            "spend": 37.5
          },
          "US": {
            "clicks": 93,
            "conversions": 12,
            "impressions": 1200,
            "revenue": 240,
            "spend": 37.5
          }
        },
        "by_device": {
          "ios": {
            "clicks": 93,
            "conversions": 12,
            "impressions": 3000,
            "revenue": 240,
            "spend": 37.5
          },
          "web": {
            "clicks": 93,
            "conversions": 12,
            "impressions": 1200,
            "revenue": 240,
            "spend": 37.5
          }
        },
        "total": {
          "clicks": 186,
          "conversions": 24,
          "impressions": 4200,
          "revenue": 480,
          "spend": 75
        }
      },
      "final": false,
      "minute": "2026-12-03T00:02:00Z"
    },
    "seq": 8,
    "type": "update"
  },
  "ws_campaigns_snapshot": {
    "channel": "campaigns",
    "data": {
      "campaigns": {
        "c7": {
          "current": {
            "clicks": 124,
            "clicks_unattributed": 4,
            "conversions": 16,
            "cpa": 3.125,
            "ctr": 0.04428571428571428,
            "cvr": 0.12903225806451613,
            "impressions": 2800,
            "revenue": 320,
            "roas": 6.4,
            "spend": 50
          },
          "today": {
            "clicks": 186,
            "clicks_unattributed": 8,
            "conversions": 24,
            "cpa": 3.125,
            "ctr": 0.04428571428571428,
            "cvr": 0.12903225806451613,
            "impressions": 4200,
            "revenue": 480,
            "roas": 6.4,
            "spend": 75
          }
        },
        "c9": {
          "current": {
            "clicks": 0,
            "clicks_unattributed": 0,
            "conversions": 0,
            "ctr": 0,
            "impressions": 100,
            "revenue": 0,
            "roas": 0,
            "spend": 1
          },
          "today": {
            "clicks": 0,
            "clicks_unattributed": 0,
            "conversions": 0,
            "ctr": 0,
            "impressions": 150,
            "revenue": 0,
            "roas": 0,
            "spend": 1.5
          }
        }
      },
      "day": "2026-12-03T00:00:00Z",
      "final": true,
      "minute": "2026-12-03T00:01:00Z"
    },
    "seq": 7,
    "type": "snapshot"
  },
  "ws_campaigns_update": {
    "channel": "campaigns",
    "data": {
      "campaigns": {
        "c7": {
          "current": {
            "clicks": 186,
            "conversions": 24,
            "impressions": 4200,
            "revenue": 480,
            "spend": 75
          }
        },
        "c9": {
          "current": {
            "impressions": 150,
            "spend": 1.5
          }
        }
      },
      "final": false,
      "minute": "2026-12-03T00:02:00Z"
    },
    "seq": 8,
    "type": "update"
  },
  "ws_engagement_snapshot": {
    "channel": "engagement",
    "data": {
      "final": true,
      "groups": {
        "DE/returning": {
          "active_sessions": 10,
          "engagement_score": 40,
          "sessions_ended": 0,
          "sessions_started": 2
        },
        "US/new": {
          "active_sessions": 24,
          "avg_session_seconds": 95.5,
          "engagement_score": 180,
          "events_per_session": 7.25,
          "sessions_ended": 4,
          "sessions_started": 8
        }
      },
      "minute": "2026-12-03T00:01:00Z"
    },
    "seq": 7,
    "type": "snapshot"
  },
  "ws_engagement_update": {
    "channel": "engagement",
    "data": {
      "final": false,
      "groups": {
        "DE/returning": {
          "active_sessions": 15,
          "engagement_score": 60,
          "sessions_started": 3
        },
        "US/new": {
          "active_sessions": 36,
          "engagement_score": 270,
          "sessions_ended": 6,
          "sessions_started": 12
        }
      },
      "minute": "2026-12-03T00:02:00Z"
    },
    "seq": 8,
    "type": "update"
  },
  "ws_error": {
    "code": "unknown_op",
    "message": "unknown op \"shout\"",
    "type": "error"
  },
  "ws_overview_snapshot": {
    "channel": "overview",
    "data": {
      "windows": {
        "2026-12-03T00:00:00Z": {
          "active_users": 30,
          "final": true,
          "traffic": {
            "like": 40,
            "view": 100
          },
          "window_start": "2026-12-03T00:00:00Z"
        },
        "2026-12-03T00:01:00Z": {
          "active_users": 60,
          "final": true,
          "traffic": {
            "like": 80,
            "view": 200
          },
          "window_start": "2026-12-03T00:01:00Z"
        }
      }
    },
    "seq": 7,
    "type": "snapshot"
  },
  "ws_overview_update": {
    "channel": "overview",
    "data": {
      "windows": {
        "2026-12-03T00:02:00Z": {
          "active_users": 90,
          "final": false,
          "traffic": {
            "like": 120,
            "view": 300
          },
          "window_start": "2026-12-03T00:02:00Z"
        }
      }
    },
    "seq": 8,
    "type": "update"
  },
  "ws_trending_snapshot": {
    "channel": "trending:5m",
    "data": {
      "end": "2026-12-03T00:06:00Z",
      "final": true,
      "start": "2026-12-03T00:01:00Z",
      "tags": [
        {
          "events": 720,
          "rank": 1,
          "score": 6,
          "tag": "rust",
          "users": 240
        },
        {
          "events": 480,
          "rank": 2,
          "score": 4,
          "tag": "kappa",
          "users": 160
        }
      ],
      "window": "5m"
    },
    "seq": 7,
    "type": "snapshot"
  },
  "ws_trending_update": {
    "channel": "trending:5m",
    "data": {
      "end": "2026-12-03T00:07:00Z",
      "final": false,
      "start": "2026-12-03T00:02:00Z",
      "tags": [
        {
          "events": 1080,
          "rank": 1,
          "score": 9,
          "tag": "rust",
          "users": 360
        },
        {
          "events": 720,
          "rank": 2,
          "score": 6,
          "tag": "kappa",
          "users": 240
        }
      ]
    },
    "seq": 8,
    "type": "update"
  }
};
