"""The `whitelist` net/rpc service of the local control socket (pty.md §2.4).

    whitelist.Whitelist        struct{}          -> []cipher.PubKey
    whitelist.WhitelistAdd     []cipher.PubKey   -> struct{}
    whitelist.WhitelistRemove  []cipher.PubKey   -> struct{}

A store error (key already present / absent, file not writable) goes back as the RPC error
string; a Go dmsgpty-cli prints it. The service never knows which store or transport it has.
"""
from __future__ import annotations

from typing import Any, List, Tuple

__all__ = ["whitelist_service", "whitelist_factory", "WHITELIST_RPC_NAME", "WHITELIST_URI"]

WHITELIST_RPC_NAME = "whitelist"
WHITELIST_URI = "dmsgpty/whitelist"


def _pks(value) -> List:
    from skypty.keys import PubKey

    return [v if isinstance(v, PubKey) else PubKey(bytes(v)) for v in (value or [])]


def whitelist_service(store) -> Tuple[str, list]:
    """`(service_name, [rpc.Method…])` backed by a Whitelist store."""
    from skypty import gob, gobtypes, rpc

    def view(_arg: Any) -> list:
        # Always a (possibly empty) list: Go sends an empty non-nil slice as a value too.
        return [bytes(pk) for pk in store.list()]

    def add(arg: Any) -> dict:
        store.add(_pks(arg))
        return {}

    def remove(arg: Any) -> dict:
        store.remove(_pks(arg))
        return {}

    return WHITELIST_RPC_NAME, [
        rpc.Method("Whitelist", gob.EMPTY, gobtypes.PubKeyList, view),
        rpc.Method("WhitelistAdd", gobtypes.PubKeyList, gob.EMPTY, add),
        rpc.Method("WhitelistRemove", gobtypes.PubKeyList, gob.EMPTY, remove),
    ]


def whitelist_factory(store):
    """A `mux.add_rpc` factory serving `store` on every connection."""
    def factory(conn, query, peer):
        return [whitelist_service(store)]
    return factory
