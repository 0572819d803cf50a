#!/usr/bin/env python3
"""A webhook receiver for Alertmanager that prints each notification.

One JSON line per alert on stdout: the receiver path (`/critical`,
`/warning`), the alert's name, status (`firing` or `resolved`) and labels.
The compose demo runs it so that notifications are visible in
`docker compose logs alert-receiver`; the end-to-end alert test reads the
same lines.

    alert-receiver.py --listen 127.0.0.1:9099
"""

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            notification = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as error:
            self.send_error(400, f"not JSON: {error}")
            return
        for alert in notification.get("alerts", []):
            line = {
                "receiver": self.path,
                "alertname": alert.get("labels", {}).get("alertname"),
                "status": alert.get("status"),
                "labels": alert.get("labels", {}),
            }
            print(json.dumps(line, sort_keys=True), flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        # Only notifications go to stdout; requests are not worth a line.
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="0.0.0.0:9099", help="HOST:PORT to listen on")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print(json.dumps({"listening": args.listen}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
