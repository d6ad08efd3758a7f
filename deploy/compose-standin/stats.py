# GET /stats on the sidecar's socket, printed as JSON: `docker compose exec -T sidecar python - < stats.py`.
import json
import socket

s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect("/run/ipc-router/sidecar.sock")
s.sendall(b"GET /stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
buf = b""
while chunk := s.recv(65536):
    buf += chunk
print(json.dumps(json.loads(buf.split(b"\r\n\r\n", 1)[1]), indent=1))
