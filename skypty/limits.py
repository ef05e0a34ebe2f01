"""Every size cap and timeout in one place (Go values unless a comment says otherwise)."""
from __future__ import annotations

# Noise transport (crypto-dmsg.md §4)
NOISE_MAX_FRAME = 4096                 # including the 2-byte length prefix
NOISE_MAX_BODY = NOISE_MAX_FRAME - 2   # 4094: a larger length prefix is fatal
NOISE_MAX_PLAINTEXT = 4070             # 4096 - 2 - 8 - 16
HANDSHAKE_TIMEOUT = 10.0               # TCP XK handshake, both sides
TCP_DIAL_TIMEOUT = 10.0

# Mux (pty.md §2.1)
MUX_MAX_URI = 255
MUX_REQUEST_TIMEOUT = 10.0             # ours: the request must arrive soon after auth

# gob / rpc: nothing from the peer is trusted for its size
GOB_MAX_MESSAGE = 17 * 1024 * 1024 + 64 * 1024   # an Exec result may carry 16 MiB + stderr
GOB_MAX_DEPTH = 32
GOB_MAX_SLICE = 1 << 20                # elements, for non-byte slices

# pty service (pty.md §3, §4)
PTY_READ_MAX = 65536
CLIENT_READ_SIZE = 32768
PING_INTERVAL = 30.0
EXEC_OUTPUT_CAP = 16 * 1024 * 1024
EXEC_STDIN_MAX = 1024 * 1024
EXEC_DEFAULT_TIMEOUT_MS = 30_000
EXEC_MAX_TIMEOUT_MS = 300_000

# exec-stream (pty.md §4.6)
EXECSTREAM_BODY_MAX = 1024 * 1024 + 64 * 1024
EXECSTREAM_DEFAULT_TIMEOUT_MS = 30 * 60 * 1000
EXECSTREAM_MAX_TIMEOUT_MS = 24 * 3600 * 1000
EXECSTREAM_KEEPALIVE = 45.0
EXECSTREAM_MAX_FRAME_PAYLOAD = 1024 * 1024
EXECSTREAM_HEADER_TIMEOUT = 10.0

# TCP host pre-auth limits (ours, like sshd's MaxStartups)
MAX_UNAUTH_CONNS = 64
MAX_UNAUTH_PER_SOURCE = 10

# ports
DEFAULT_TCP_PORT = 2022
DEFAULT_DMSG_PORT = 22
