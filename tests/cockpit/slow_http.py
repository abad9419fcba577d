#!/usr/bin/env python3
# The model server of the Cockpit browser test: serves the files of one directory over plain
# HTTP on loopback (modvisord accepts http:// only there), HEAD and GET with Content-Length,
# and sends a GET's body in chunks with a pause between them, so that a pull takes a few
# seconds and its progress bar is seen between 0 and 100 %. Every request goes to the log.
#   slow_http.py PORT DIR LOG [CHUNK_BYTES] [PAUSE_SECONDS]
import http.server
import os
import sys
import time

port, root, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
chunk = int(sys.argv[4]) if len(sys.argv) > 4 else 48 * 1024
pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.25


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def file(self):
        name = self.path.split("?", 1)[0].lstrip("/")
        if not name or "/" in name or name.startswith("."):
            return None
        p = os.path.join(root, name)
        return p if os.path.isfile(p) else None

    def head(self):
        p = self.file()
        with open(log, "a") as f:
            f.write(f"{self.command} {self.path} {self.headers.get('Range', '-')}\n")
        if p is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        size = os.path.getsize(p)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        return p

    def do_HEAD(self):
        self.head()

    def do_GET(self):
        p = self.head()
        if p is None:
            return
        with open(p, "rb") as f:
            while True:
                b = f.read(chunk)
                if not b:
                    break
                self.wfile.write(b)
                self.wfile.flush()
                time.sleep(pause)

    def log_message(self, *a):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
