"""Typed errors for zmqdisagg.

Every error a user can cause derives from :class:`ZmqDisaggError`, and every message says what to
change. Errors that happen on the server travel back to the client as an ``error`` reply carrying the
class name (``code``) and the message; :func:`from_code` turns that back into the same class on the
client, so ``except PeerTimeout`` works the same for local and remote targets.
"""

from __future__ import annotations


class ZmqDisaggError(Exception):
    """Base class of every zmqdisagg error."""

    code = "ZmqDisaggError"


class ConfigError(ZmqDisaggError, ValueError):
    """A configuration value or CLI flag is wrong; the message names the field and a valid value."""

    code = "ConfigError"


class TransportUnavailable(ZmqDisaggError):
    """The requested data-plane transport cannot run between these two peers."""

    code = "TransportUnavailable"


class PeerTimeout(ZmqDisaggError, TimeoutError):
    """The peer did not answer within the configured deadline (it is gone, stopped or overloaded)."""

    code = "PeerTimeout"


class ProtocolMismatch(ZmqDisaggError):
    """The peer speaks another schema version, or sent frames that do not follow the protocol."""

    code = "ProtocolMismatch"


class RemoteError(ZmqDisaggError):
    """The server failed while handling a request; the message carries the server's explanation."""

    code = "RemoteError"


class BadRequest(RemoteError):
    """The request itself is invalid (unknown op, bad token ids, wrong dtype or shape, too large)."""

    code = "BadRequest"


class ResourceExhausted(RemoteError):
    """The server has no free buffer slot for this connection; release slots or raise the limit."""

    code = "ResourceExhausted"


class UnknownClient(ProtocolMismatch):
    """The server does not know this client (it restarted, or the client's lease expired); say hello again."""

    code = "UnknownClient"


class NoServerAvailable(PeerTimeout):
    """Every configured target server has failed (a ``PeerTimeout`` for the last one); training cannot continue."""

    code = "NoServerAvailable"


_BY_CODE = {
    cls.code: cls
    for cls in (
        ZmqDisaggError,
        ConfigError,
        TransportUnavailable,
        PeerTimeout,
        ProtocolMismatch,
        UnknownClient,
        RemoteError,
        BadRequest,
        ResourceExhausted,
        NoServerAvailable,
    )
}


def from_code(code: str, message: str) -> ZmqDisaggError:
    """Rebuild the error class named by ``code`` (unknown codes become :class:`RemoteError`)."""
    return _BY_CODE.get(code, RemoteError)(message)
