"""What the firewall reads from masqd's configuration, written as Protocols.

``masqd.config.Config`` satisfies ``RouterConfig`` as it is; the firewall
never imports the configuration module (the configuration imports the
firewall, to validate rules and to take the forward types from ``model``).
Only the attributes named here are read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Protocol

from masqd.firewall.model import PortForward, ProtoForward


class StructuredRule(Protocol):
    """One ``[[firewall.rule]]``: the fields of an ``ipchains -A`` line, as strings in its syntax."""

    @property
    def chain(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def proto(self) -> str: ...
    @property
    def src(self) -> str: ...
    @property
    def sport(self) -> str: ...
    @property
    def dst(self) -> str: ...
    @property
    def dport(self) -> str: ...
    @property
    def iface(self) -> str: ...
    @property
    def syn(self) -> bool | None: ...
    @property
    def fragment(self) -> bool | None: ...
    @property
    def log(self) -> bool: ...
    @property
    def bidirectional(self) -> bool: ...
    @property
    def position(self) -> int | None: ...


class FirewallSettings(Protocol):
    """``[firewall]``: policies, rule text, a rules file, aliases and structured rules."""

    @property
    def input_policy(self) -> str: ...
    @property
    def forward_policy(self) -> str: ...
    @property
    def output_policy(self) -> str: ...
    @property
    def rules(self) -> str: ...
    @property
    def rules_file(self) -> str | None: ...
    @property
    def aliases(self) -> Mapping[str, str]: ...
    @property
    def rule(self) -> Sequence[StructuredRule]: ...


class ForwardSettings(Protocol):
    """``[forwarding]``: forwards written as TOML rather than as rule lines."""

    @property
    def portfw(self) -> Sequence[PortForward]: ...
    @property
    def protofw(self) -> Sequence[ProtoForward]: ...


class Side(Protocol):
    """``[lan]`` or ``[wan]``: masqd's own address on that side."""

    @property
    def address(self) -> ipaddress.IPv4Interface: ...


class RouterConfig(Protocol):
    """The parts of a configuration that decide the rule set."""

    @property
    def lan(self) -> Side: ...
    @property
    def wan(self) -> Side: ...
    @property
    def firewall(self) -> FirewallSettings: ...
    @property
    def forwarding(self) -> ForwardSettings: ...
    @property
    def source(self) -> str: ...
