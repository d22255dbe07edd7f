# A blocking HTTP/1.1 client (Python's http.client, no socket timeout, so every recv() is a
# blocking one): N requests over keep-alive connections of K requests each; every answer is
# checked. Prints one JSON report. Used by tests/e2e/fastpath.rs.
import http.client
import json
import sys

host, port, total, per_conn = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ok, errors, conns = 0, [], 0
i = 0
while i < total:
    conn = http.client.HTTPConnection(host, port)  # timeout=None: blocking socket
    conns += 1
    try:
        for _ in range(min(per_conn, total - i)):
            path = "/r%d" % i
            i += 1
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200 and body == b"ok " + path.encode() + b"\n":
                ok += 1
            else:
                errors.append("request %d: status %d body %r" % (i, resp.status, body[:80]))
    except Exception as e:  # noqa: BLE001 - every failure is reported, none is retried
        errors.append("request %d: %s: %s" % (i, type(e).__name__, e))
    finally:
        conn.close()
print(json.dumps({"ok": ok, "errors": len(errors), "first_errors": errors[:5], "connections": conns}))
