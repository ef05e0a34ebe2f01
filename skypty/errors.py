"""Exceptions the user can see, and the exit codes they map to (one place)."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1        # transport / RPC failure, bad input at run time
EXIT_USAGE = 2          # bad flags, bad config
EXIT_TIMEOUT = 124      # remote command timed out
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_REMOTE_FAILED = 255  # remote ExitCode -1 without a timeout (killed, spawn failure): Go's os.Exit(-1)


class SkyptyError(Exception):
    """An error with a one-line message meant for the user."""

    exit_code = EXIT_FAILURE


class UsageError(SkyptyError):
    """Bad flags, arguments or configuration: exit 2."""

    exit_code = EXIT_USAGE


class KeyFormatError(UsageError, ValueError):
    """A public or secret key that does not parse or is not on the curve."""


class DestinationError(UsageError, ValueError):
    """A destination string (`<pk>@host:port`, `tcp://…`, `dmsg://…`) that does not parse."""


class HandshakeError(SkyptyError):
    """The Noise handshake failed (wrong pinned key, timeout, garbage)."""


class ProtocolError(SkyptyError):
    """The peer sent bytes that break the wire contract (bad frame, bad gob, bad nonce)."""


class RejectedError(SkyptyError):
    """The host refused the request (whitelist or unknown URI)."""


class RequestDroppedError(RejectedError):
    """The host hung up instead of answering the mux request: over TCP, a client key it does
    not whitelist. (A plain RejectedError is its 0x01: it has no such subsystem.)"""
