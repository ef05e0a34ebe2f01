"""dmsg transport (crypto-dmsg.md §5-§7), one small module per layer:

- `yamux`   hashicorp/yamux v0.1.2 sessions and streams on a plain TCP socket
- `disc`    discovery entries (Go-exact signing), HTTP client, `skypty dmsg disc`
- `session` XK session handshake, session-object encryption, DmsgSession (XK + yamux)
- `stream`  signed StreamRequest/StreamResponse, dmsg error codes, DmsgStream (KK records)
- `client`  DmsgClient (sessions, entry, dial/listen), serve_dmsg (mode 2), dial_standalone
- `server`  `skypty dmsg server`: sessions, relaying, IP lookup, discovery registration

Modules are imported on use: `import skypty.transport.dmsg.client` etc.
"""
from __future__ import annotations

__all__ = ["yamux", "disc", "session", "stream", "client", "server"]
