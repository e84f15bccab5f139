"""PPTP control messages (RFC 2637 section 2): header layout, lengths and Call ID fields.

One job: the facts about the control channel that the PPTP helper works from,
as tables. Every control message starts with the same 12-byte header::

    0..1   Length                 the whole message, header included
    2..3   PPTP Message Type      1 = control message
    4..7   Magic Cookie           0x1A2B3C4D
    8..9   Control Message Type   1..15
    10..11 Reserved0

and every message that names a call carries its Call IDs right after the
header, at offsets 12 and 14. A field is either the sender's *own* Call ID
(the ID the sender chose for the call) or the *peer's* Call ID (the ID the
receiver chose). ``check_header`` is the edge check of a header.
"""

from __future__ import annotations

from masqd.wire.ipv4 import Malformed

PPTP_PORT = 1723
MAGIC = 0x1A2B3C4D
MAGIC_BYTES = MAGIC.to_bytes(4, "big")
HDR_LEN = 12
MSG_CONTROL = 1
# The largest defined message is 220 bytes; anything claiming more than this is garbage.
MAX_LEN = 512

START_CTRL_REQ = 1
START_CTRL_REPLY = 2
STOP_CTRL_REQ = 3
STOP_CTRL_REPLY = 4
ECHO_REQ = 5
ECHO_REPLY = 6
OUT_CALL_REQ = 7
OUT_CALL_REPLY = 8
IN_CALL_REQ = 9
IN_CALL_REPLY = 10
IN_CALL_CONNECTED = 11
CALL_CLEAR_REQ = 12
CALL_DISCONNECT_NOTIFY = 13
WAN_ERROR_NOTIFY = 14
SET_LINK_INFO = 15

NAMES = {
    START_CTRL_REQ: "Start-Control-Connection-Request",
    START_CTRL_REPLY: "Start-Control-Connection-Reply",
    STOP_CTRL_REQ: "Stop-Control-Connection-Request",
    STOP_CTRL_REPLY: "Stop-Control-Connection-Reply",
    ECHO_REQ: "Echo-Request",
    ECHO_REPLY: "Echo-Reply",
    OUT_CALL_REQ: "Outgoing-Call-Request",
    OUT_CALL_REPLY: "Outgoing-Call-Reply",
    IN_CALL_REQ: "Incoming-Call-Request",
    IN_CALL_REPLY: "Incoming-Call-Reply",
    IN_CALL_CONNECTED: "Incoming-Call-Connected",
    CALL_CLEAR_REQ: "Call-Clear-Request",
    CALL_DISCONNECT_NOTIFY: "Call-Disconnect-Notify",
    WAN_ERROR_NOTIFY: "WAN-Error-Notify",
    SET_LINK_INFO: "Set-Link-Info",
}

# Length of each message as defined by RFC 2637 (header included). A message
# shorter than this is malformed; longer (up to MAX_LEN) is tolerated.
LENGTHS = {
    START_CTRL_REQ: 156,
    START_CTRL_REPLY: 156,
    STOP_CTRL_REQ: 16,
    STOP_CTRL_REPLY: 16,
    ECHO_REQ: 16,
    ECHO_REPLY: 20,
    OUT_CALL_REQ: 168,
    OUT_CALL_REPLY: 32,
    IN_CALL_REQ: 220,
    IN_CALL_REPLY: 24,
    IN_CALL_CONNECTED: 28,
    CALL_CLEAR_REQ: 16,
    CALL_DISCONNECT_NOTIFY: 148,
    WAN_ERROR_NOTIFY: 40,
    SET_LINK_INFO: 24,
}

OWN, PEER = 0, 1
# Call ID fields per message type: (offset from the message start, OWN or PEER).
# Call-Clear-Request carries the ID the PNS chose; Call-Disconnect-Notify the ID
# the PAC chose; both are the sender's own.
CALL_ID_FIELDS: dict[int, tuple[tuple[int, int], ...]] = {
    OUT_CALL_REQ: ((12, OWN),),
    OUT_CALL_REPLY: ((12, OWN), (14, PEER)),
    IN_CALL_REQ: ((12, OWN),),
    IN_CALL_REPLY: ((12, OWN), (14, PEER)),
    IN_CALL_CONNECTED: ((12, PEER),),
    CALL_CLEAR_REQ: ((12, OWN),),
    CALL_DISCONNECT_NOTIFY: ((12, OWN),),
    WAN_ERROR_NOTIFY: ((12, PEER),),
    SET_LINK_INFO: ((12, PEER),),
}
# Result Code byte of the replies, and its "call is up" value.
RESULT_OFF = 16
RESULT_OK = {OUT_CALL_REPLY: 1, IN_CALL_REPLY: 1}


def check_header(hdr: bytes | bytearray) -> tuple[int, int]:
    """Validate the first 12 bytes of a control message: (length, control type).
    Unknown control types are returned as they are (length-framed, passed on)."""
    if len(hdr) < HDR_LEN:
        raise Malformed("pptp_truncated")
    length = (hdr[0] << 8) | hdr[1]
    if hdr[4:8] != MAGIC_BYTES:
        raise Malformed("pptp_bad_magic")
    if ((hdr[2] << 8) | hdr[3]) != MSG_CONTROL:
        raise Malformed("pptp_bad_message_type")
    if length < HDR_LEN or length > MAX_LEN:
        raise Malformed("pptp_bad_length")
    ctype = (hdr[8] << 8) | hdr[9]
    if length < LENGTHS.get(ctype, HDR_LEN):
        raise Malformed("pptp_bad_length")
    return length, ctype


def build(ctype: int, call_id: int = 0, peer_call_id: int = 0, result: int = 1, length: int | None = None) -> bytes:
    """A control message with its Call ID fields set and a zero body (tests and benchmarks)."""
    n = LENGTHS.get(ctype, HDR_LEN) if length is None else length
    msg = bytearray(max(n, 16))
    msg[0:2] = n.to_bytes(2, "big")
    msg[2:4] = MSG_CONTROL.to_bytes(2, "big")
    msg[4:8] = MAGIC_BYTES
    msg[8:10] = ctype.to_bytes(2, "big")
    for off, kind in CALL_ID_FIELDS.get(ctype, ()):
        msg[off:off + 2] = (call_id if kind == OWN else peer_call_id).to_bytes(2, "big")
    if ctype in RESULT_OK and n > RESULT_OFF:
        msg[RESULT_OFF] = result
    return bytes(msg[:n])
