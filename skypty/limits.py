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

# TCP host pre-auth limits (ours, like sshd's MaxStartups "full" value of 100): connections
# that have not yet passed the whitelist. Per source leaves room for others when one address
# floods, while a burst from one host (a NAT, 50 parallel execs) mostly fits; the rest are
# reset and the client retries (CLIENT_HANDSHAKE_RETRY_DELAYS).
MAX_UNAUTH_CONNS = 100
MAX_UNAUTH_PER_SOURCE = 30

# ports
DEFAULT_TCP_PORT = 2022
DEFAULT_DMSG_PORT = 22

# config / control socket (ours)
CONFIG_MAX_BYTES = 1024 * 1024         # a host config is a few hundred bytes; refuse anything huge
CONTROL_PROBE_TIMEOUT = 1.0            # "is somebody listening on this unix socket?" before replacing it
CONTROL_DIAL_TIMEOUT = 10.0

# Browser terminal: WebSocket (RFC 6455) and the web bridge (pty.md §8); ours unless noted
WS_MAX_FRAME = 1024 * 1024             # one frame's payload; larger -> close 1009
WS_MAX_MESSAGE = 4 * 1024 * 1024       # a reassembled message (a big paste); larger -> close 1009
WS_HEADER_MAX = 16 * 1024              # the whole HTTP upgrade request head
WS_HEADER_TIMEOUT = 10.0               # to receive the request head
WS_CLOSE_TIMEOUT = 2.0                 # wait for the peer's close frame after ours
WS_PING_INTERVAL = 10.0                # Go value
WS_PONG_TIMEOUT = 8.0                  # Go value: no pong by then -> close 1001
WEB_FLUSH_INTERVAL = 0.016             # Go value: coalesce pty output, at most one frame per 16 ms
WEB_OUTPUT_BUFFER = 1024 * 1024        # pending output before the pty Read loop waits for the browser
WEB_REATTACH_GRACE = 5.0               # a persistent session whose tab went away is stopped after this

# dmsg (crypto-dmsg.md §5-§7); "ours" marks values Go does not fix
YAMUX_WINDOW = 256 * 1024              # hashicorp/yamux initial (= max) stream window
YAMUX_ACCEPT_BACKLOG = 256
YAMUX_KEEPALIVE = 30.0
YAMUX_WRITE_TIMEOUT = 10.0             # ConnectionWriteTimeout: also the ping answer deadline
YAMUX_OPEN_TIMEOUT = 75.0              # a stream not ACKed in time kills the session
YAMUX_MAX_STREAMS = 1024               # ours: per session, bounds buffered memory
YAMUX_MAX_FRAME = 64 * 1024            # ours: largest Data frame we send
YAMUX_CLOSE_TIMEOUT = 300.0            # StreamCloseTimeout: half-closed stream reaped after this
DMSG_SESSION_HANDSHAKE_TIMEOUT = 10.0  # Go develop uses 5 s; ours is a little kinder
DMSG_STREAM_HANDSHAKE_TIMEOUT = 20.0   # HandshakeTimeout: request/response/KK on a stream
DMSG_LISTENER_BACKLOG = 20             # AcceptBufferSize
DMSG_FIRST_EPHEMERAL_PORT = 49153      # counter starts at 49152, incremented before use
DMSG_MAX_OBJECT = 65535                # session object frame: any u16
DMSG_DEFAULT_SESSIONS = 1
DMSG_RECONNECT_MIN = 0.5               # ours (Go: 5 s): first back-off after a lost session
DMSG_RECONNECT_MAX = 8.0               # ours (Go: 1 min)
DMSG_CLIENT_UPDATE_INTERVAL = 300.0    # client entry refresh when due (Go UpdateInterval)
DMSG_SERVER_UPDATE_INTERVAL = 60.0     # server entry refresh
DMSG_SERVER_MAX_SESSIONS = 2048
DMSG_IP_PORT = 1                       # port of the server's IP lookup
DISC_HTTP_TIMEOUT = 10.0               # client side, per request
DISC_SERVER_IO_TIMEOUT = 3.0           # Go's http.Server read/write timeouts
DISC_MAX_BODY = 64 * 1024              # ours: POST/DELETE body cap
DISC_MAX_RESPONSE = 8 * 1024 * 1024    # ours: largest discovery answer we read
DISC_MAX_ENTRIES = 100_000             # ours: in-memory store cap
DISC_MAX_SERVERS_LISTED = 512
DISC_SERVER_TS_PAST = 60.0             # server entry timestamp window [now-1m, now+5s]
DISC_SERVER_TS_FUTURE = 5.0
DISC_CLIENT_TIMEOUT_TTL = 180.0        # ?timeout=true legacy TTL

# exec-stream request reading (ours / Go http.Server settings)
EXECSTREAM_HEADER_MAX = 64 * 1024      # ours: the one request's header block
EXECSTREAM_READ_TIMEOUT = 30.0         # Go ReadTimeout: header + body

# host shutdown: how long to wait for connection threads after closing them
HOST_SHUTDOWN_GRACE = 5.0

# gob (ours)
GOB_MAX_TYPES = 1024                   # type definitions one decoder accepts from its peer

# net/rpc (ours): calls a connection may have in flight before the server stops reading
RPC_MAX_INFLIGHT = 64
RPC_DRAIN_TIMEOUT = 330.0              # at connection end, wait this long for running calls
RPC_SLOT_POLL_MS = 20                  # all slots busy and a call parked: re-check a slot this often

# SFTP subsystem and fs mount (ours: upstream sets none)
SFTP_MAX_PACKET = 4 * 1024 * 1024      # one SFTP packet from the peer (either side); larger ends the session
SFTP_MAX_READ = 1024 * 1024            # one READ answer (the client's length is clamped, short reads are legal)
SFTP_INIT_TIMEOUT = 10.0               # the client's SSH_FXP_INIT must arrive within this
FS_LINK_TIMEOUT = 8.0                  # no byte from the host for this long while a request waits -> EIO
FS_READ_CHUNK = 128 * 1024             # one pipelined READ request
FS_READAHEAD_CHUNKS = 16               # READ requests in flight per sequentially read file
FS_WRITE_INFLIGHT = 8 * 1024 * 1024    # unacknowledged WRITE bytes per open file
FS_READDIR_PIPELINE = 8                # READDIR requests in flight per directory listing
FS_CACHE_MAX = 200_000                 # cached attributes / listings kept by a mount

# client: a host over its pre-auth cap resets the connection before its handshake reply; the
# client retries a reset (never an EOF: that is a wrong pinned key) after these jittered
# pauses (x 0.5-1.0), enough for a burst of handshakes ahead of it to finish
CLIENT_HANDSHAKE_RETRY_DELAYS = (0.1, 0.3, 0.9)

# gob (ours): bytes of type definitions one decoder accepts; the protocol's own are < 1 KiB, and
# each defined field costs ~100x its wire size in memory
GOB_MAX_TYPE_BYTES = 256 * 1024
FS_MAX_DIR_ENTRIES = 1_000_000         # entries of one directory listing the mount accepts
SFTP_MAX_HANDLES = 1024                # open files per sftp session on the host
NODE_RPC_DIAL_TIMEOUT = 5.0            # client -> node RPC (localhost:3435), as upstream
NODE_RPC_BUDGET = 15.0                 # the node's own dial budget on top of TimeoutMS (pty.md §11)
EXEC_CALL_SLACK = 15.0                 # client: wait this much past the remote timeout for an Exec reply
FS_RELIST_MAX = 10_000                 # a directory up to this size is re-listed rather than stat'ed name by name
CLIENT_PROXY_REQUEST_TIMEOUT = 30.0    # client: the control socket's dmsgpty/proxy answers after its own dmsg dial
FS_OPEN_AHEAD = 8                      # files opened ahead when a directory is read file after file

# TCP keepalive on every host and client TCP connection (ours): a peer whose network vanished
# is declared dead after IDLE + INTERVAL * COUNT = 120 s without an answer
TCP_KEEPALIVE_IDLE = 60
TCP_KEEPALIVE_INTERVAL = 10
TCP_KEEPALIVE_COUNT = 6
EXECSTREAM_TRAILER_MAX = 8 * 1024      # ours: request trailers after a chunked body (read, ignored)
CLOSE_DRAIN_TIMEOUT = 2.0              # ours: after FIN, how long we read what the peer still sends
REJECT_DRAIN_MAX = 64 * 1024           # ours: bytes discarded from a client the whitelist refused
EXECSTREAM_DRAIN_MAX = 4 * 1024 * 1024 # ours: bytes discarded after an exec-stream error answer
