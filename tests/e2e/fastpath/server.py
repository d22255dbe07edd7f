# A blocking HTTP/1.1 keep-alive server (Python's http.server, one thread per connection),
# answering every GET with a small body. Used by tests/e2e/fastpath.rs.
import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"ok " + self.path.encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


port = int(sys.argv[1])
http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
